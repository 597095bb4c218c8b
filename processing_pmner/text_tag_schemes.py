"""Tag schemes of P-MNER: BIO and BIOES tags, converting between them, and the check that a processor reads a model's
logits as the model's own tags.

Copied flat into saved processor folders (remote code) with `processing_pmner.py`: imports nothing beyond the
standard library.
"""


def _split_tag(tag: str, index: int | None, scheme: str) -> tuple[str, str]:
    where = "" if index is None else f" at position {index}"
    if not isinstance(tag, str):
        raise ValueError(f"tag {tag!r}{where} is not a string")
    if tag == "O":
        return "O", ""
    prefix, dash, entity = tag.partition("-")
    if not dash or not entity or prefix not in scheme:
        raise ValueError(f"tag {tag!r}{where} is not a {scheme} tag")
    return prefix, entity


def tag_parts(tag: str) -> tuple[str, str | None]:
    """`("B", "PER")` for `B-PER`, `("O", None)` for `O`; a `ValueError` for anything that is not a BIO/BIOES tag."""
    prefix, entity = _split_tag(tag, None, "BIOES")
    return prefix, entity or None


def bio_to_bioes(tags: list[str]) -> list[str]:
    """BIO tags to BIOES: a single-word entity becomes S-, the last word of a longer one E-.

    Exact for well-formed BIO (`bioes_to_bio(bio_to_bioes(tags)) == tags`). An I- that starts an entity (after O or
    another type) is read as a beginning, as conlleval does.
    """
    parts = [_split_tag(tag, index, "BI") for index, tag in enumerate(tags)]
    result = []
    for index, (prefix, entity) in enumerate(parts):
        if prefix == "O":
            result.append("O")
            continue
        previous = parts[index - 1] if index > 0 else ("O", "")
        following = parts[index + 1] if index + 1 < len(parts) else ("O", "")
        begins = prefix == "B" or previous[0] == "O" or previous[1] != entity
        continues = following == ("I", entity)
        if begins:
            result.append(f"{'B' if continues else 'S'}-{entity}")
        else:
            result.append(f"{'I' if continues else 'E'}-{entity}")
    return result


def bioes_to_bio(tags: list[str]) -> list[str]:
    """BIOES tags to BIO: S- becomes B-, E- becomes I-. Exact for well-formed BIOES
    (`bio_to_bioes(bioes_to_bio(tags)) == tags`)."""
    result = []
    for index, tag in enumerate(tags):
        prefix, entity = _split_tag(tag, index, "BIOES")
        if prefix == "O":
            result.append("O")
        else:
            result.append(f"{ {'B': 'B', 'S': 'B', 'I': 'I', 'E': 'I'}[prefix]}-{entity}")
    return result


def tag_scheme_of(tags) -> str:
    """"BIOES" when any tag starts with E- or S-, else "BIO"."""
    return "BIOES" if any(isinstance(tag, str) and tag[:2] in ("E-", "S-") for tag in tags) else "BIO"


def convert_tags(tags: list[str], scheme: str) -> list[str]:
    """Tags (BIO or BIOES, detected) in `scheme`."""
    source = tag_scheme_of(tags)
    if source == scheme:
        _ = [_split_tag(tag, index, "BI" if scheme == "BIO" else "BIOES") for index, tag in enumerate(tags)]
        return list(tags)
    return bio_to_bioes(tags) if scheme == "BIOES" else bioes_to_bio(tags)


def check_processor_matches_model(processor, config) -> None:
    """Raises a `ValueError` naming both sides when the processor's tags (`label_names`, in id order) or tag scheme
    differ from the model's (`config.id2label`, `config.tag_scheme`): the model's logits would be read as other tags.
    Call it wherever a processor and a model are loaded beside each other (the pipeline does)."""
    num_labels = getattr(config, "num_labels", None) or len(config.id2label)
    id2label = {int(index): label for index, label in config.id2label.items()}
    model_labels = [id2label.get(index) for index in range(num_labels)]
    processor_labels = list(processor.label_names)
    model_scheme = getattr(config, "tag_scheme", None) or tag_scheme_of(model_labels)
    processor_scheme = getattr(processor, "tag_scheme", None) or tag_scheme_of(processor_labels)
    problems = []
    if processor_labels != model_labels:
        problems.append(
            f"the processor's label_names ({len(processor_labels)} tags) {processor_labels} differ from the model's "
            f"config.id2label ({len(model_labels)} tags) {model_labels}"
        )
    if processor_scheme != model_scheme:
        problems.append(f"the processor's tag scheme {processor_scheme} differs from the model's {model_scheme}")
    if problems:
        raise ValueError(
            "; ".join(problems) + ". They must be the same tags in the same order: save the processor that was "
            "trained with this model (processor.save_pretrained(folder)), or build it with "
            "label_names=[config.id2label[i] for i in range(config.num_labels)]"
        )



__all__ = [
    "bio_to_bioes",
    "bioes_to_bio",
    "check_processor_matches_model",
    "convert_tags",
    "tag_parts",
    "tag_scheme_of",
]
