"""P-MNER demo page (Gradio): a tweet and an optional image in; the tweet with its entities highlighted and, for
visual models, the image with the FRR objects boxed, each entity linked to the object it is grounded to.

    python app.py --model outputs/run                      # a model folder (or a Hub id), served on 127.0.0.1:7860
    python app.py --model user/pmner-twitter2017 --trust-remote-code --port 8080

Needs the `demo` extra (`pip install -e ".[demo]"`). As a Hugging Face Space, see `space/README.md`: the Space runs
this file with `PMNER_MODEL` (and `PMNER_TRUST_REMOTE_CODE=1`) set, and Gradio's `GRADIO_SERVER_NAME` /
`GRADIO_SERVER_PORT`.

Grounding is read from TCFM's text-to-object attention (`pipeline(..., return_grounding=True)`): the model was never
trained to ground entities, so a box is where the entity's words looked, not a supervised prediction.

Nothing here reaches the internet on its own: Gradio's analytics are off, no share link, system fonts only. Bad
input (an empty or over-long tweet, an image that cannot be read or is too large) gives a message in the page; the
app keeps serving.
"""

import argparse
import html
import logging
import os
import sys
import time
import warnings

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # before gradio is imported: no usage reports
os.environ.setdefault("GRADIO_TELEMETRY_ENABLED", "False")

logger = logging.getLogger("pmner.app")

# A tweet is at most 280 characters; longer text is tagged (in overlapping windows) up to this many characters.
MAX_CHARACTERS = 20_000
# The boxed image is shown at most this wide / high (boxes scaled with it).
DISPLAY_SIDE = 800
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324", "#469990", "#808000"]
TYPE_COLOURS = {"PER": "#ffd6d6", "LOC": "#d6f5d6", "ORG": "#d6e4ff", "MISC": "#fff0c2", "OTHER": "#fff0c2"}
CSS = """
.pmner-tweet { font-size: 1.15em; line-height: 2.2em; }
.pmner-entity { border-radius: 4px; padding: 2px 4px; margin: 0 1px; white-space: nowrap; }
.pmner-type { font-size: 0.7em; font-weight: bold; margin-left: 4px; }
.pmner-box { font-size: 0.7em; color: white; border-radius: 3px; padding: 0 3px; margin-left: 3px; }
.pmner-message { border-left: 4px solid #f58231; padding: 4px 10px; background: #fff7ef; }
table.pmner-table td, table.pmner-table th { padding: 2px 8px; }
"""


# ----------------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------------


def load_model(model: str, trust_remote_code: bool = False, device: str | None = "cpu"):
    """The `multimodal-ner` pipeline of a P-MNER folder or Hub id: this package's classes when it is installed,
    else (or with `trust_remote_code`) the code saved with the model."""
    try:
        if not trust_remote_code:  # the classes load_pipeline uses: a missing one is named in the message below
            import modeling_pmner  # noqa: F401
            import processing_pmner.pipeline_pmner  # noqa: F401
        from predict_pmner.loading import load_pipeline
    except ImportError as error:  # as on a Space: only the model folder's code is there
        if not trust_remote_code:
            raise SystemExit(
                f"app.py: the pmner package is not installed ({error}); pass --trust-remote-code (or set "
                "PMNER_TRUST_REMOTE_CODE=1) to run the code saved with the model"
            ) from error
        from transformers import pipeline

        return pipeline("multimodal-ner", model=model, device=device, trust_remote_code=True)
    return load_pipeline(model, device, trust_remote_code=trust_remote_code)


# ----------------------------------------------------------------------------------------------------------------------
# One request
# ----------------------------------------------------------------------------------------------------------------------


class Demo:
    """What the page calls: `answer(text, image_path)` -> (tweet HTML, boxed image or None, details HTML)."""

    def __init__(self, pipe, grounding_threshold: float | None = None):
        self.pipe = pipe
        self.use_visual = bool(getattr(pipe, "use_visual", False))
        self.grounding_threshold = grounding_threshold

    def answer(self, text, image_path=None):
        """Never raises: problems become a message in the page (logged with their traceback here)."""
        started = time.perf_counter()
        try:
            tweet_html, picture, details = self._answer(text, image_path)
        except Exception as error:  # reported in the page and logged; the app keeps serving
            logger.exception("request failed")
            return "", None, _message(f"Something went wrong: {type(error).__name__}: {error}")
        seconds = time.perf_counter() - started
        return tweet_html, picture, details + f'<p class="pmner-time">answered in {seconds:.2f} s</p>'

    def _answer(self, text, image_path):
        text = "" if text is None else str(text)
        if not text.strip():
            return "", None, _message("Type a tweet first: the text is empty.")
        if len(text) > MAX_CHARACTERS:
            return "", None, _message(
                f"The text has {len(text):,} characters; this demo tags at most {MAX_CHARACTERS:,} (a tweet has at "
                "most 280). Shorten it and try again."
            )
        notes, item, objects, picture = [], {"text": text}, None, None
        if image_path and not self.use_visual:
            notes.append("This model is text-only: the image is not used.")
        elif image_path:
            objects, problem = self._objects(image_path)
            if problem is None:
                picture, problem = self._display_image(image_path)
            if problem is not None:
                notes.append(f"{problem} The tweet was tagged from its text alone.")
                objects = None
            else:
                item.update(objects.pop("inputs"))
        words = len(text.split())
        if words > 100:
            notes.append(
                f"A long text ({words:,} words): a text longer than the model's input is tagged in overlapping "
                "windows."
            )
        options = {"return_grounding": True} if objects is not None else {}
        if objects is not None and self.grounding_threshold is not None:
            options["grounding_threshold"] = self.grounding_threshold
        entities = self.pipe(item, **options)
        slots = objects["slots"] if objects is not None else []
        if picture is not None:
            try:
                picture = _draw(picture, slots, entities)
            except Exception as error:  # the entities are still shown; the drawing failure is logged and noted
                logger.exception("drawing the boxes failed")
                notes.append(f"The boxes could not be drawn ({type(error).__name__}: {error}); the entities are below.")
                picture = None
        return _tweet_html(text, entities), picture, _details_html(entities, slots, notes, objects is not None)

    def _objects(self, image_path):
        """`({"inputs": the pipeline's visual inputs, "slots": per object its slot, box (original pixels), label and
        score}, None)`, or `(None, message)` for an image the image processor could not read."""
        image_processor = self.pipe.processor.image_processor
        image_processor.reset_bad_images()
        name = os.path.basename(str(image_path))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the BadImageWarning: its text is read from bad_images below
                output = image_processor([image_path], return_boxes=True, device=self.pipe.device)
        except ValueError as error:  # BadImageError (a processor saved with on_bad_image="error"), a bad size
            image_processor.reset_bad_images()
            return None, f"The image {name} could not be used: {error}."
        if image_processor.bad_images:
            reason = image_processor.bad_images[-1][1]
            image_processor.reset_bad_images()
            return None, f"The image {name} could not be used: {reason}."
        slots = []
        for slot, present in enumerate(output["visual_mask"][0].tolist()):
            if not present:
                continue
            score = float(output["visual_scores"][0, slot])
            slots.append(
                {
                    "slot": slot,
                    "box": [float(value) for value in output["visual_boxes"][0, slot].tolist()],
                    "label": image_processor.label_name(int(output["visual_labels"][0, slot])),
                    "score": None if score != score else score,  # NaN: the whole image, no detector score
                }
            )
        inputs = {
            key: output[key][0]
            for key in ("visual_features", "visual_mask", "visual_boxes", "visual_labels", "visual_scores")
        }
        return {"inputs": inputs, "slots": slots}, None

    @staticmethod
    def _display_image(path):
        """`(the image at most DISPLAY_SIDE wide and high, None)` or `(None, message)`; `info["pmner_scale"]` maps
        the boxes' pixels (original image, after EXIF orientation) to the shown image's."""
        from PIL import Image, ImageOps

        try:
            with Image.open(path) as opened:
                width, height = opened.size  # full size, read from the header
                if opened.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the sides
                    width, height = height, width
                opened.draft("RGB", (2 * DISPLAY_SIDE, 2 * DISPLAY_SIDE))  # JPEG: decoded at a smaller scale
                picture = ImageOps.exif_transpose(opened).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            return None, f"The image {os.path.basename(str(path))} could not be shown ({type(error).__name__}: {error})."
        scale = min(1.0, DISPLAY_SIDE / max(width, height))
        picture = picture.resize((max(1, round(width * scale)), max(1, round(height * scale))))
        picture.info["pmner_scale"] = picture.width / width  # box pixels (original image) -> display pixels
        return picture, None


# ----------------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------------


def _message(text: str) -> str:
    return f'<div class="pmner-message">{html.escape(text)}</div>'


def _slot_colour(slot: int) -> str:
    return PALETTE[slot % len(PALETTE)]


def _tweet_html(text: str, entities: list[dict]) -> str:
    parts, position = [], 0
    for entity in sorted(entities, key=lambda entity: entity["start"]):
        parts.append(html.escape(text[position : entity["start"]]))
        colour = TYPE_COLOURS.get(entity["entity_group"], "#eeeeee")
        grounding = entity.get("grounding")
        box = ""
        if grounding is not None:
            box = (
                f'<span class="pmner-box" style="background:{_slot_colour(grounding["slot"])}">box '
                f'{grounding["slot"] + 1}</span>'
            )
        parts.append(
            f'<mark class="pmner-entity" data-type="{html.escape(entity["entity_group"])}" '
            f'title="{html.escape(entity["entity_group"])} {entity["score"]:.2f}" style="background:{colour}">'
            f'{html.escape(text[entity["start"] : entity["end"]])}<span class="pmner-type">'
            f'{html.escape(entity["entity_group"])} {entity["score"]:.2f}</span>{box}</mark>'
        )
        position = entity["end"]
    parts.append(html.escape(text[position:]))
    found = f"{len(entities)} entit{'y' if len(entities) == 1 else 'ies'}"
    return f'<div class="pmner-tweet" data-entities="{len(entities)}">{"".join(parts)}</div><p>{found}</p>'


def _details_html(entities: list[dict], objects: list[dict], notes: list[str], with_image: bool) -> str:
    rows = []
    for entity in entities:
        grounding = entity.get("grounding")
        if grounding is None:
            linked = "-" if not with_image else "not grounded (no object, or attention not clearly above uniform)"
        else:
            label = grounding["label"] or "object"
            linked = f'box {grounding["slot"] + 1} ({html.escape(label)}), attention {grounding["weight"]:.2f}'
        rows.append(
            f'<tr class="pmner-row"><td>{html.escape(entity["word"])}</td><td>{html.escape(entity["entity_group"])}</td>'
            f'<td>{entity["score"]:.2f}</td><td class="pmner-grounding">{linked}</td></tr>'
        )
    table = (
        '<table class="pmner-table"><tr><th>entity</th><th>type</th><th>score</th><th>image object</th></tr>'
        + "".join(rows) + "</table>"
        if rows else "<p>No entity found.</p>"
    )
    boxes = ""
    if objects:
        items = "".join(
            f'<li><span class="pmner-box" style="background:{_slot_colour(item["slot"])}">box {item["slot"] + 1}</span> '
            f'{html.escape(item["label"] or "object")}'
            + (f' {item["score"]:.2f}' if item["score"] is not None else "")
            + "</li>"
            for item in objects
        )
        boxes = f'<p>FRR objects:</p><ul class="pmner-objects">{items}</ul>'
    messages = "".join(_message(note) for note in notes)
    footnote = (
        "<p><small>Boxes are read from the model's text-to-object attention (TCFM); the model had no grounding "
        "supervision.</small></p>" if with_image else ""
    )
    return messages + table + boxes + footnote


def _draw(image, objects: list[dict], entities: list[dict]):
    """A copy of `image` with each FRR object boxed and numbered, with the entities grounded to it (boxes, in the
    original image's pixels, scaled by `image.info["pmner_scale"]`)."""
    from PIL import ImageDraw, ImageFont

    scale = image.info.get("pmner_scale", 1.0)
    picture = image.copy()
    draw = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 250))
    font = ImageFont.load_default(size=max(10, round(max(picture.size) / 45)))
    boxes = [[value * scale for value in item["box"]] for item in objects]
    for item, (x1, y1, x2, y2) in zip(objects, boxes):  # boxes first, then captions (no line crosses a caption)
        # a box under 1 display pixel wide or high is still drawn (PIL refuses x2 < x1)
        draw.rectangle([x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)], outline=_slot_colour(item["slot"]), width=width)
    taken = []  # caption rectangles drawn so far: a caption never covers another
    for item, (x1, y1, x2, y2) in zip(objects, boxes):
        colour = _slot_colour(item["slot"])
        names = [entity["word"] for entity in entities if (entity.get("grounding") or {}).get("slot") == item["slot"]]
        caption = f'{item["slot"] + 1} {item["label"] or ""}' + (f' <- {", ".join(names)}' if names else "")
        # at most the box's width (or a third of the picture for a narrow box): the table below lists every entity
        caption = _fit(draw, font, caption, max(x2 - x1 - 2 * width, picture.size[0] / 3))
        x, y = _caption_place(draw, font, caption, (x1 + width, y1 + width), taken, picture.size)
        left, top, right, bottom = draw.textbbox((x, y), caption, font=font)
        draw.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=colour)
        draw.text((x, y), caption, fill="white", font=font)
        taken.append((left - 1, top - 1, right + 1, bottom + 1))
    return picture


def _fit(draw, font, caption: str, room: float) -> str:
    """`caption`, cut with an ellipsis to at most `room` pixels wide (its slot number always kept)."""
    if draw.textlength(caption, font=font) <= room:
        return caption
    number = caption.split(" ", 1)[0]
    while len(caption) > len(number) and draw.textlength(caption + "...", font=font) > room:
        caption = caption[:-1]
    return caption.rstrip() + "..."


def _caption_place(draw, font, caption: str, start: tuple, taken: list, size: tuple) -> tuple:
    """Where `caption` goes: at `start` (a box's top left corner), kept inside the picture, moved down below any
    caption it would cover (a bounded number of steps; the last place is kept if the picture is full)."""
    x, y = start
    left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
    x = max(0.0, min(x, size[0] - (right - left) - 2))
    y = max(0.0, min(y, size[1] - (bottom - top) - 2))
    for _ in range(len(taken) + 1):
        box = (x + left - 1, y + top - 1, x + right + 1, y + bottom + 1)
        covered = [other for other in taken if box[0] < other[2] and other[0] < box[2] and box[1] < other[3]
                   and other[1] < box[3]]
        if not covered or max(other[3] for other in covered) + (bottom - top) + 2 > size[1]:
            break
        y = max(other[3] for other in covered) + 1 - top
    return x, y


# ----------------------------------------------------------------------------------------------------------------------
# Page
# ----------------------------------------------------------------------------------------------------------------------


def build_page(demo: Demo, title: str = "P-MNER"):
    import gradio as gr

    with gr.Blocks(title=title, analytics_enabled=False) as page:
        gr.Markdown(
            f"# {html.escape(title)}: named entities of a tweet and its image\n"
            "Type a tweet and, optionally, attach its image. Entities are highlighted with their type and score; "
            "for a visual model the image shows the objects the model saw (FRR), and each entity names the object "
            "its words attended to most."
        )
        with gr.Row():
            with gr.Column():
                text = gr.Textbox(label="Tweet", lines=3, placeholder="Kawhi Leonard wins the fan vote #NBAAwards",
                                  elem_id="pmner-text")
                image = gr.File(label="Image (optional)", type="filepath", elem_id="pmner-image",
                                visible=True)
                submit = gr.Button("Find entities", variant="primary", elem_id="pmner-submit")
            with gr.Column():
                tweet = gr.HTML(elem_id="pmner-output")
                picture = gr.Image(label="FRR objects", type="pil", format="png", interactive=False, elem_id="pmner-picture")
                details = gr.HTML(elem_id="pmner-details")
        submit.click(demo.answer, inputs=[text, image], outputs=[tweet, picture, details])
        text.submit(demo.answer, inputs=[text, image], outputs=[tweet, picture, details])
    return page


def theme():
    import gradio as gr

    # system fonts only: the default theme would fetch web fonts from the internet
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="P-MNER demo page (Gradio).")
    parser.add_argument("--model", default=os.environ.get("PMNER_MODEL"), help="Model folder or Hub id (env PMNER_MODEL).")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", "7860")))
    parser.add_argument(
        "--trust-remote-code", action="store_true", default=os.environ.get("PMNER_TRUST_REMOTE_CODE") == "1",
        help="Run the code saved with the model (needed when the pmner package is not installed; env "
        "PMNER_TRUST_REMOTE_CODE=1).",
    )
    parser.add_argument("--device", default="cpu", help="'cpu' (default) or 'cuda'.")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    parser.add_argument("--grounding-threshold", type=float, default=None,
                        help="How far above uniform attention (1/n over n objects) an entity's top weight must be to "
                        "link it to a box: weight >= (1 + this) / n (default: the pipeline's, 0.25; 0 links every "
                        "entity of an image with objects).")
    parser.add_argument("--max-file-size", default="25mb", help="Largest upload Gradio accepts.")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.model:
        print("app.py: error: pass --model FOLDER_OR_HUB_ID (or set PMNER_MODEL)", file=sys.stderr)
        return 2
    if args.grounding_threshold is not None and not 0.0 <= args.grounding_threshold < float("inf"):
        print(f"app.py: error: --grounding-threshold must be a number >= 0, got {args.grounding_threshold}", file=sys.stderr)
        return 2
    if not 1 <= args.port <= 65535:
        print(f"app.py: error: --port must be in [1, 65535], got {args.port}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print(f"app.py: error: --threads must be at least 1, got {args.threads}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.model.startswith(("/", "./", "../", "~")) and not os.path.isdir(os.path.expanduser(args.model)):
        print(f"app.py: error: --model {args.model}: no such folder", file=sys.stderr)
        return 2
    started = time.perf_counter()
    try:
        pipe = load_model(args.model, args.trust_remote_code, args.device)
        demo = Demo(pipe, args.grounding_threshold)
        if demo.use_visual:  # FRR's detector and backbone are built (their saved weights checked) now
            pipe.processor.image_processor.load_models(pipe.device)
    except Exception as error:  # not a folder, not a P-MNER model, damaged weights, missing imports, ...: one line
        logger.debug("loading the model failed", exc_info=True)
        print(f"app.py: error: --model {args.model}: cannot load it ({type(error).__name__}: {error})", file=sys.stderr)
        return 2
    demo.answer("warm up", None)  # the first forward pass is slower: done before the page is served
    logger.info(f"model {args.model} loaded in {time.perf_counter() - started:.1f} s")
    page = build_page(demo, title="P-MNER")
    page.queue(default_concurrency_limit=1)  # one request at a time on the one model
    try:
        page.launch(
            server_name=args.host, server_port=args.port, share=False, ssr_mode=False,
            max_file_size=args.max_file_size, theme=theme(), css=CSS, footer_links=[], quiet=False,
        )
    except OSError as error:  # e.g. the port is taken
        print(f"app.py: error: cannot serve on --host {args.host} --port {args.port}: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
