"""Entity grounding (`pipeline(..., return_grounding=True)`, `pmner-predict --grounding`): the selection on
hand-made attention, the image processor's detector labels and scores, and end to end with a tiny visual model whose
random detector (score threshold 0) always finds objects."""

import json
import math
import os

import numpy as np
import pytest
import torch

from fixtures import run_without_project
from grounding_builders import TEXT, blocks_image, detecting_image_processor, write_tiny_grounding_folder
from processing_pmner import PMNERImageProcessor
from processing_pmner.pipeline_grounding import (
    add_grounding,
    required_weight,
    entity_words,
    ground_entity,
    head_mean,
    slot_objects,
    word_attentions,
)
from processing_pmner.image_processing_pmner import NO_OBJECT_LABEL, WHOLE_IMAGE_LABEL
from processing_pmner.pipeline_pmner import PMNERPipeline
from predict_pmner.cli import main as predict_main


# ----------------------------------------------------------------------------------------------------------------------
# Selection on hand-made attention
# ----------------------------------------------------------------------------------------------------------------------


OBJECTS = [
    {"box": [0.0, 0.0, 10.0, 10.0], "label": "person", "score": 0.99},
    {"box": [5.0, 5.0, 20.0, 30.0], "label": "dog", "score": 0.97},
    {"box": [0.0, 0.0, 64.0, 48.0], "label": "whole image", "score": None},
]


def test_an_entity_is_grounded_to_the_object_its_words_attend_to_most():
    attention = np.array([[0.1, 0.7, 0.2], [0.6, 0.3, 0.1]], dtype=np.float32)  # (words, objects)
    grounding = ground_entity([0], attention, [True, True, True], OBJECTS, threshold=0.25)
    assert grounding == {"slot": 1, "box": [5.0, 5.0, 20.0, 30.0], "label": "dog", "score": 0.97, "weight": pytest.approx(0.7)}
    assert ground_entity([1], attention, [True, True, True], OBJECTS)["slot"] == 0


def test_a_multi_word_entity_averages_its_words_attention():
    # word 0 prefers slot 1 (0.5), word 1 slot 0 (0.45); averaged: slot 0 0.4, slot 1 0.35, slot 2 0.25
    attention = np.array([[0.35, 0.5, 0.15], [0.45, 0.2, 0.35]], dtype=np.float32)
    grounding = ground_entity([0, 1], attention, [True, True, True], OBJECTS, threshold=0.0)
    assert grounding["slot"] == 0 and grounding["weight"] == pytest.approx(0.4)


def test_weights_not_clearly_above_uniform_and_images_without_objects_ground_nothing():
    attention = np.array([[0.3, 0.35, 0.35]], dtype=np.float32)
    # 3 objects: uniform is 1/3; the bar is (1 + threshold) / 3
    assert ground_entity([0], attention, [True, True, True], OBJECTS) is None  # 0.35 < 1.25 / 3
    assert ground_entity([0], attention, [True, True, True], OBJECTS, threshold=0.06) is None  # 0.35 < 0.3533
    assert ground_entity([0], attention, [True, True, True], OBJECTS, threshold=0.04)["weight"] == pytest.approx(0.35)
    # exactly uniform attention (float32) is grounded at threshold 0 and not above it
    uniform = np.full((1, 3), 1 / 3, dtype=np.float32)
    assert ground_entity([0], uniform, [True, True, True], OBJECTS, threshold=0.0)["slot"] == 0
    assert ground_entity([0], uniform, [True, True, True], OBJECTS, threshold=0.01) is None
    # the bar follows the number of objects present: 0.6 over 2 objects (bar 0.625) is not enough, over 5 it is
    two = np.array([[0.6, 0.4, 0.0, 0.0, 0.0]], dtype=np.float32)
    assert ground_entity([0], two, [True, True, False, False, False], None) is None
    five = np.array([[0.6, 0.1, 0.1, 0.1, 0.1]], dtype=np.float32)
    assert ground_entity([0], five, [True] * 5, None)["weight"] == pytest.approx(0.6)
    # a single object (e.g. the whole-image filler alone: the detector found nothing) has attention 1 whatever the
    # text says: nothing is grounded, unless threshold 0 asks for every entity to be
    alone = np.array([[1.0]], dtype=np.float32)
    assert ground_entity([0], alone, [True], OBJECTS[2:]) is None
    assert ground_entity([0], alone, [True], OBJECTS[2:], threshold=0.0)["label"] == "whole image"
    assert required_weight(0.25, 5) == pytest.approx(0.25) and required_weight(0.25, 2) == pytest.approx(0.625)
    assert ground_entity([0], attention, [False, False, False], OBJECTS, threshold=0.0) is None  # no object
    assert ground_entity([], attention, [True, True, True], OBJECTS, threshold=0.0) is None  # no word
    # an empty slot is never chosen, even where its (meaningless) attention is highest
    masked = np.array([[0.6, 0.4, 0.9]], dtype=np.float32)  # the real softmax gives the present slots sum 1
    assert ground_entity([0], masked, [True, True, False], OBJECTS, threshold=0.0)["slot"] == 0


def test_unknown_boxes_give_the_slot_and_weight_only():
    attention = np.array([[0.2, 0.8]], dtype=np.float32)
    assert ground_entity([0], attention, [True, True], None, threshold=0.0) == {
        "slot": 1, "box": None, "label": None, "score": None, "weight": pytest.approx(0.8),
    }


def test_word_attentions_are_read_where_each_word_is_predicted_across_windows():
    # two tweets: tweet 0 (3 words) in two window rows, tweet 1 (1 word) in one row; length 5, 2 objects
    attention = np.zeros((3, 5, 2), dtype=np.float32)
    attention[0, 1] = [0.9, 0.1]  # tweet 0, word 0
    attention[0, 2] = [0.8, 0.2]  # tweet 0, word 1
    attention[0, 3] = [0.0, 1.0]  # tweet 0, word 2 in the first window: not where it is predicted
    attention[1, 2] = [0.3, 0.7]  # tweet 0, word 2 in the window that owns it
    attention[2, 1] = [0.6, 0.4]  # tweet 1, word 0
    mapping = {
        "prediction_word_index": [[-1, 0, 1, -1, -1], [-1, -1, 2, -1, -1], [-1, 0, -1, -1, -1]],
        "sample_mapping": [0, 0, 1],
    }
    words = word_attentions(attention, mapping, [3, 1])
    np.testing.assert_allclose(words[0], [[0.9, 0.1], [0.8, 0.2], [0.3, 0.7]])
    np.testing.assert_allclose(words[1], [[0.6, 0.4]])
    with pytest.raises(ValueError, match="rows, length"):
        word_attentions(attention[:2], mapping, [3, 1])


def test_head_mean_and_entity_words():
    attention = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])  # (rows 1, heads 2, length 1, objects 2)
    np.testing.assert_allclose(head_mean(attention), [[[0.5, 0.5]]])
    with pytest.raises(ValueError, match="rows, heads, length, objects"):
        head_mean(attention[0])
    spans = [(0, 5), (6, 13), (14, 18)]  # "Kawhi Leonard wins"
    assert entity_words({"start": 0, "end": 13}, spans) == [0, 1]
    assert entity_words({"start": 14, "end": 18}, spans) == [2]


def test_add_grounding_without_object_attention_grounds_nothing():
    entities = [{"entity_group": "PER", "start": 0, "end": 5}]
    assert add_grounding(entities, [(0, 5)], None, [True], OBJECTS)[0]["grounding"] is None


def test_slot_objects_names_labels_and_leaves_the_whole_image_without_score():
    boxes = torch.tensor([[1.04, 2.0, 3.0, 4.0], [0.0, 0.0, 64.0, 48.0], [0.0, 0.0, 0.0, 0.0]])
    labels = torch.tensor([1, WHOLE_IMAGE_LABEL, NO_OBJECT_LABEL])
    scores = torch.tensor([0.98768, float("nan"), 0.0])
    processor = PMNERImageProcessor(detector="fasterrcnn_resnet50_fpn_v2", detector_weights="random:0")
    objects = slot_objects(boxes, labels, scores, [True, True, False], processor.label_name)
    assert objects == [
        {"box": [1.0, 2.0, 3.0, 4.0], "label": "person", "score": 0.9877},
        {"box": [0.0, 0.0, 64.0, 48.0], "label": "whole image", "score": None},
        None,
    ]
    named = slot_objects(boxes[:1], ["cat"], None, [True], processor.label_name)
    assert named == [{"box": [1.0, 2.0, 3.0, 4.0], "label": "cat", "score": None}]


# ----------------------------------------------------------------------------------------------------------------------
# Image processor: labels and scores next to the boxes
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detecting():
    return detecting_image_processor()


def test_image_processor_returns_detector_labels_and_scores_with_the_boxes(detecting):
    output = detecting([blocks_image(), None], return_boxes=True)
    assert set(output) == {"visual_features", "visual_mask", "visual_boxes", "visual_labels", "visual_scores"}
    assert output["visual_labels"].dtype == torch.long and output["visual_scores"].shape == (2, 3)
    assert output["visual_mask"][0].all()  # three detections at score threshold 0
    assert (output["visual_labels"][0] >= 1).all() and (output["visual_scores"][0] > 0).all()
    assert all(detecting.label_name(label) in detecting.detection_categories() for label in output["visual_labels"][0].tolist())
    assert output["visual_labels"][1].tolist() == [NO_OBJECT_LABEL] * 3  # no image: no object
    # the 4-value extract is unchanged; with return_detections the same labels and scores come last
    four = detecting.extract([blocks_image()])
    assert len(four) == 4
    *_, labels, scores = detecting.extract([blocks_image()], return_num_detections=True, return_detections=True)
    assert torch.equal(labels[0], output["visual_labels"][0]) and torch.allclose(scores[0], output["visual_scores"][0])


def test_the_whole_image_filler_has_its_own_label_and_no_score():
    processor = PMNERImageProcessor(detector=None, backbone="resnet18", backbone_weights="random:0", crop_size=32, max_objects=2)
    output = processor(blocks_image(), return_boxes=True)
    assert output["visual_labels"][0].tolist() == [WHOLE_IMAGE_LABEL, NO_OBJECT_LABEL]
    assert math.isnan(float(output["visual_scores"][0, 0]))
    assert processor.label_name(WHOLE_IMAGE_LABEL) == "whole image" and processor.label_name(NO_OBJECT_LABEL) is None
    assert processor.detection_categories() is None
    other = PMNERImageProcessor(detector="fasterrcnn_resnet50_fpn_v2", detector_weights="random:0",
                                detector_kwargs={"num_classes": 3})
    assert other.label_name(2) == "class 2"  # not COCO's 91 classes: no names


# ----------------------------------------------------------------------------------------------------------------------
# End to end
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grounding_folder(tmp_path_factory):
    return write_tiny_grounding_folder(tmp_path_factory.mktemp("grounding"))


@pytest.fixture(scope="module")
def grounding_pipe(grounding_folder):
    from transformers import pipeline

    return pipeline("multimodal-ner", model=grounding_folder, pipeline_class=PMNERPipeline, device="cpu")


def test_pipeline_grounds_entities_to_boxes_in_original_image_pixels(grounding_pipe, tmp_path):
    small, large = tmp_path / "small.png", tmp_path / "large.png"
    blocks_image(64, 48).save(small)
    blocks_image(256, 192).save(large)
    plain = grounding_pipe(TEXT, image=str(small))
    assert plain and all("grounding" not in entity for entity in plain)  # unchanged without return_grounding
    entities = grounding_pipe(TEXT, image=str(small), return_grounding=True, grounding_threshold=0)
    assert [entity["word"] for entity in entities] == TEXT.split()
    assert [{key: e[key] for key in e if key != "grounding"} for e in entities] == plain
    output = grounding_pipe.processor.image_processor(str(small), return_boxes=True)
    for entity in entities:
        grounding = entity["grounding"]
        assert grounding is not None  # threshold 0: the highest of 3 weights is at least uniform, 1/3
        slot = grounding["slot"]
        assert grounding["box"] == pytest.approx(output["visual_boxes"][0, slot].tolist(), abs=0.06)
        assert grounding["label"] == grounding_pipe.processor.image_processor.label_name(int(output["visual_labels"][0, slot]))
        assert grounding["score"] == pytest.approx(float(output["visual_scores"][0, slot]), abs=1e-4)
        assert 1 / 3 - 1e-6 <= grounding["weight"] <= 1.0
        x1, y1, x2, y2 = grounding["box"]
        assert 0 <= x1 < x2 <= 64 and 0 <= y1 < y2 <= 48
    # a high threshold grounds nothing; no image grounds nothing; other outputs carry the grounding too
    # (the bar (1 + 2) / 3 = 1 is above any weight but exactly 1, which 3 seeded random objects never give)
    assert all(e["grounding"] is None for e in grounding_pipe(TEXT, image=str(small), return_grounding=True, grounding_threshold=2.0))
    assert all(e["grounding"] is None for e in grounding_pipe(TEXT, return_grounding=True))
    words = grounding_pipe(TEXT, image=str(small), return_grounding=True, grounding_threshold=0, return_words=True)
    assert [e["grounding"] for e in words["entities"]] == [e["grounding"] for e in entities]
    with pytest.raises(ValueError, match="grounding_threshold"):
        grounding_pipe(TEXT, return_grounding=True, grounding_threshold=-0.5)


class ColourBlockDetector(torch.nn.Module):
    """A detector that finds the red block (label 18, "dog", score 0.99) and the blue block (label 1, "person",
    score 0.9) of `blocks_image` by their colour, in the pixels of the image it is given."""

    COLOURS = (((200, 30, 30), 18, 0.99), ((30, 40, 200), 1, 0.9))

    def forward(self, images):
        results = []
        for image in images:  # (3, H, W) in [0, 1]
            boxes, labels, scores = [], [], []
            for colour, label, score in self.COLOURS:
                target = torch.tensor(colour, dtype=image.dtype).view(3, 1, 1) / 255.0
                ys, xs = torch.nonzero(((image - target).abs() < 0.1).all(0), as_tuple=True)
                boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
                labels.append(label)
                scores.append(score)
            results.append({"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
                            "scores": torch.tensor(scores)})
        return results


def test_boxes_are_in_the_original_image_pixels_whatever_its_size(grounding_pipe):
    """The image processor works on images downscaled to `max_image_side`; grounded boxes are mapped back to the
    pixels of the image as given: a 4x larger copy gets 4x larger boxes, at the blocks' known places."""
    from copy import deepcopy

    processor = deepcopy(grounding_pipe.processor)
    image_processor = processor.image_processor
    image_processor.max_image_side = 64  # a 256 x 192 image is processed at 64 x 48
    image_processor.load_models("cpu")
    image_processor.set_modules(image_processor._backbone_module, image_processor.feature_dim, detector=ColourBlockDetector())
    pipe = PMNERPipeline(model=grounding_pipe.model, processor=processor, device="cpu")
    small = pipe(TEXT, image=blocks_image(64, 48), return_grounding=True, grounding_threshold=0)
    large = pipe(TEXT, image=blocks_image(256, 192), return_grounding=True, grounding_threshold=0)
    red, blue = [0, 0, 16, 16], [16, 32, 32, 48]  # blocks (1 x 1 of the 4 x 3 grid) of the 64 x 48 image
    # an injected detector has no category names: its labels are "class <index>"
    known = {"class 18": (red, 0.99), "class 1": (blue, 0.9), "whole image": ([0, 0, 64, 48], None)}
    for before, after in zip(small, large):
        for grounding, factor in ((before["grounding"], 1), (after["grounding"], 4)):
            box, score = known[grounding["label"]]
            # within one processed pixel (the downscaled block edges blur): 4 pixels of the large image
            assert grounding["box"] == pytest.approx([factor * value for value in box], abs=1.0 * factor)
            assert grounding["score"] == (None if score is None else pytest.approx(score))
        assert after["grounding"]["slot"] == before["grounding"]["slot"]
    assert {entity["grounding"]["label"] for entity in small} <= set(known)


def test_precomputed_features_ground_with_and_without_their_boxes(grounding_pipe, tmp_path):
    image = blocks_image()
    from_image = grounding_pipe(TEXT, image=image, return_grounding=True, grounding_threshold=0)
    output = grounding_pipe.processor.image_processor(image, return_boxes=True)
    features = {key: output[key][0] for key in output}
    with_boxes = grounding_pipe(dict(text=TEXT, **features), return_grounding=True, grounding_threshold=0)
    assert [e["grounding"] for e in with_boxes] == [e["grounding"] for e in from_image]
    without = grounding_pipe(
        {"text": TEXT, "visual_features": features["visual_features"], "visual_mask": features["visual_mask"]},
        return_grounding=True, grounding_threshold=0,
    )
    for known, bare in zip(from_image, without):
        assert bare["grounding"] == {**known["grounding"], "box": None, "label": None, "score": None}


def test_grounding_travels_with_the_saved_folder_as_remote_code(grounding_folder, grounding_pipe, tmp_path):
    assert {"pipeline_grounding.py", "pipeline_inputs.py", "pipeline_entities.py", "pipeline_quantization.py"} <= set(
        os.listdir(grounding_folder)
    )
    blocks_image().save(tmp_path / "photo.png")
    script = f"""
        import json
        from transformers import pipeline
        ner = pipeline(model={grounding_folder!r}, trust_remote_code=True, device="cpu")
        print("RESULT " + json.dumps(ner({TEXT!r}, image={str(tmp_path / "photo.png")!r}, return_grounding=True, grounding_threshold=0)))
    """
    completed = run_without_project(script, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = json.loads(completed.stdout.split("RESULT ", 1)[1])
    expected = json.loads(json.dumps(grounding_pipe(TEXT, image=str(tmp_path / "photo.png"), return_grounding=True, grounding_threshold=0)))
    assert [e["word"] for e in remote] == [e["word"] for e in expected]
    for got, want in zip(remote, expected):
        assert got["grounding"]["slot"] == want["grounding"]["slot"] and got["grounding"]["label"] == want["grounding"]["label"]
        assert got["grounding"]["box"] == pytest.approx(want["grounding"]["box"], abs=0.11)


def test_cli_grounding_writes_boxes_in_jsonl(grounding_folder, grounding_pipe, tmp_path, capsys):
    blocks_image().save(tmp_path / "photo.png")
    source = tmp_path / "tweets.jsonl"
    source.write_text(
        json.dumps({"id": "a", "text": TEXT, "image": "photo.png"}) + "\n" + json.dumps({"id": "b", "text": "no image here"}) + "\n"
    )
    output = tmp_path / "tagged.jsonl"
    code = predict_main([grounding_folder, str(source), "-o", str(output), "--image-dir", str(tmp_path), "--grounding",
                         "--grounding-threshold", "0", "--no-progress", "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    first, second = [json.loads(line) for line in output.read_text().splitlines()]
    assert first["entities"] and all(entity["grounding"]["box"] is not None for entity in first["entities"])
    assert all(len(entity["grounding"]["box"]) == 4 and entity["grounding"]["label"] for entity in first["entities"])
    assert second["entities"] and all(entity["grounding"] is None for entity in second["entities"])
    # the same as the pipeline's own grounding of that image
    expected = grounding_pipe(TEXT, image=str(tmp_path / "photo.png"), return_grounding=True, grounding_threshold=0)
    assert [e["grounding"]["box"] for e in first["entities"]] == [e["grounding"]["box"] for e in expected]
    # without --grounding: no grounding key; CoNLL output cannot carry it
    plain = tmp_path / "plain.jsonl"
    assert predict_main([grounding_folder, str(source), "-o", str(plain), "--image-dir", str(tmp_path), "--no-progress"]) == 0
    assert all("grounding" not in entity for entity in json.loads(plain.read_text().splitlines()[0])["entities"])
    conll = tmp_path / "out.conll"
    assert predict_main([grounding_folder, str(source), "-o", str(conll), "--output-format", "conll", "--grounding"]) == 2
    assert "--grounding needs JSONL output" in capsys.readouterr().err
