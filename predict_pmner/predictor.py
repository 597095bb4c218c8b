"""`Predictor`: tags the records of one batch with the pipeline, with visual features from the FRR feature cache
when it has them; features it computes are added to the cache, shard by shard."""

import os
import warnings

from processing_pmner.image_feature_cache import CorruptCacheShard
from .reading import Record


class Predictor:
    """Tags batches of records with the pipeline, with visual features from the FRR cache when it has them."""

    def __init__(self, pipe, args, report):
        self.pipe = pipe
        self.args = args
        self.bad_images = []  # (line, message) since the last `take_bad_images`
        self.cached_features = self.computed_features = self.written_features = 0
        self.use_visual = pipe.use_visual
        self.image_processor = pipe.processor.image_processor
        self.cache = None
        self.pending = ([], [], [], [])  # keys, features, masks, detection counts waiting to be written to the cache
        self.written_keys = set()
        if args.feature_cache_dir and self.use_visual:
            self.cache = self.image_processor.feature_cache(args.feature_cache_dir).load()
            where = self.cache.folder
            if len(self.cache):
                report(f"feature cache: {len(self.cache)} images in {where}")
            else:
                report(
                    f"feature cache: nothing cached yet in {where} for this model's FRR settings; features are "
                    + ("computed and added to it" if not args.no_cache_write else "computed (--no-cache-write)")
                )
        elif args.feature_cache_dir:
            report("the model is text-only (use_visual=False): --feature-cache-dir and images are not used")

    def cache_key(self, record: Record) -> str | None:
        if record.image_id is not None:
            return record.image_id
        if record.image is not None and os.path.isfile(record.image):
            from processing_pmner.image_loading import content_key

            return content_key(record.image)
        return None

    def visual_inputs(self, records: list[Record]) -> list:
        """Per record `(features (M, D), mask (M,))` or `None` (no image, or an unreadable one)."""
        result = [None] * len(records)
        if not self.use_visual:
            return result
        to_compute = []
        for index, record in enumerate(records):
            key = self.cache_key(record) if self.cache is not None else None
            # with --grounding an image is encoded again when it can be: the cache holds no boxes
            boxes_needed = self.args.grounding and record.image is not None and os.path.isfile(record.image)
            if key is not None and key in self.cache and not boxes_needed:
                try:
                    result[index] = self.cache.get(key)
                    self.cached_features += 1
                    continue
                except CorruptCacheShard as error:  # set aside with a warning; computed again from the image
                    if record.image is None:
                        raise ValueError(f"{error}, and the record names no image to compute it from") from None
            if record.image is not None:
                to_compute.append((index, key))
        if not to_compute:
            return result
        from processing_pmner.image_loading import BadImageWarning

        images = [records[index].image for index, _ in to_compute]
        names = [records[index].image for index, _ in to_compute]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", BadImageWarning)
            features, masks, boxes, bad, detections, labels, scores = self.image_processor.extract(
                images, names, device=self.pipe.device, return_num_detections=True, return_detections=True
            )
        for warning in caught:
            if not issubclass(warning.category, BadImageWarning):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        bad = set(bad)
        messages = {name: message for name, message in self.image_processor.bad_images}
        self.image_processor.reset_bad_images()
        for row, (index, key) in enumerate(to_compute):
            line = records[index].line
            if row in bad:
                message = messages.get(names[row], f"image {records[index].image} could not be read")
                self.bad_images.append((line, message))
                continue
            result[index] = (features[row], masks[row], boxes[row], labels[row], scores[row])
            self.computed_features += 1
            writable = self.cache is not None and key is not None and not self.args.no_cache_write
            if writable and key not in self.written_keys and key not in self.cache:
                self.pending[0].append(key)
                self.pending[1].append(features[row])
                self.pending[2].append(masks[row])
                self.pending[3].append(int(detections[row]))
        if len(self.pending[0]) >= self.args.cache_flush_size:
            self.flush_cache()
        return result

    def flush_cache(self):
        """Writes the features computed since the last flush as one cache shard. They are not kept in memory: a
        later tweet with the same key (a repeated image) is encoded again, and not written twice."""
        keys, features, masks, detections = self.pending
        self.pending = ([], [], [], [])
        unique = {}
        for key, feature, mask, count in zip(keys, features, masks, detections):
            if key not in self.written_keys:
                unique.setdefault(key, (feature, mask, count))
        if not unique:
            return
        import torch

        self.cache.write_shard(
            list(unique),
            torch.stack([value[0] for value in unique.values()]),  # (n, M, D)
            torch.stack([value[1] for value in unique.values()]),  # (n, M)
            num_detections=[value[2] for value in unique.values()],  # (n,): detections before the whole-image filler
        )
        self.written_keys.update(unique)
        self.written_features += len(unique)

    def take_bad_images(self) -> list:
        taken, self.bad_images = self.bad_images, []
        return taken

    def pipeline_item(self, record: Record, visual) -> dict:
        item = {"text": record.text} if record.text is not None else {"words": record.words}
        if record.context is not None:
            item["context"] = record.context
        if visual is not None:
            item["visual_features"], item["visual_mask"] = visual[:2]
            if len(visual) > 2 and self.args.grounding:  # computed here: boxes (M, 4), labels (M,), scores (M,)
                item["visual_boxes"], item["visual_labels"], item["visual_scores"] = visual[2:]
        return item

    def run(self, records: list[Record]) -> list:
        """Per record, the pipeline's result (`{"text", "entities", "words"}`), or an exception for a record
        that failed. A failing batch is retried one record at a time to find the failing lines."""
        try:
            visual = self.visual_inputs(records)
            items = [self.pipeline_item(record, entry) for record, entry in zip(records, visual)]
            grounding = {"return_grounding": True, "grounding_threshold": self.args.grounding_threshold}
            return self.pipe(items, batch_size=len(items), return_words=True, **(grounding if self.args.grounding else {}))
        except Exception as error:  # isolated below, record by record; each failure is reported with its line
            if len(records) == 1:
                return [error]
            return [self.run([record])[0] for record in records]
