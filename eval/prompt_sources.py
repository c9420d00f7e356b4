"""Prompt sources for batch generation, each read into a list of `PromptItem`:

- `.txt`   one prompt a line (blank lines skipped);
- `.tsv`   PartiPrompts-style: a header row with a `Prompt` column; other columns (Category, Challenge, ...)
           are kept with each prompt and recorded in the manifest;
- `.jsonl` one JSON object a line: `prompt` (required), `seed` and `negative_prompt` (optional); other
           fields are kept and recorded;
- `.json`  COCO-2017 captions (`annotations/captions_val2017.json`): one caption per image, the one with the
           smallest annotation id (deterministic; its id and the image's file name are recorded), images in
           id order: 5000 prompts for val2017, whose images are the FID reference;
- `shapes-heldout` (not a file): the embedded model's 500 one-object + 200 two-object held-out prompts.

Every problem is a `PromptSourceError` naming the file (and line) and the reason.
"""
import csv
import io
import json
import os
from dataclasses import dataclass, field

SHAPES_HELDOUT = "shapes-heldout"
FORMATS = (".txt", ".tsv", ".jsonl", ".json")
MAX_SEED = 2 ** 63 - 1


class PromptSourceError(ValueError):
    pass


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    seed: int = None  # None: the run's base seed + the image's index
    negative_prompt: str = None  # None: the run's --negative-prompt
    extra: dict = field(default_factory=dict, compare=False)  # recorded with the image (ids, categories)


def read_text(path, what="file"):
    """The file's text; PromptSourceError naming the file when it is missing, a folder, or not UTF-8."""
    if os.path.isdir(path):
        raise PromptSourceError(f"{what} {path!r} is a folder, expected a file")
    if not os.path.isfile(path):
        raise PromptSourceError(f"{what} {path!r} does not exist")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PromptSourceError(f"{what} {path!r} cannot be read: {e.strerror}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptSourceError(f"{what} {path!r} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset "
                                f"{e.start}): save it as UTF-8") from None


def _check_seed(seed, where):
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise PromptSourceError(f"{where}: seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    return seed


def _check_prompt(prompt, where, name="prompt"):
    if not isinstance(prompt, str) or not prompt.strip():
        raise PromptSourceError(f"{where}: {name} must be a non-empty string, got {prompt!r}")
    return prompt.strip()


def load_txt(path):
    return [PromptItem(line.strip()) for line in read_text(path, "prompt file").splitlines() if line.strip()]


def load_tsv(path):
    rows = list(csv.reader(io.StringIO(read_text(path, "prompt file")), delimiter="\t"))
    if not rows:
        return []
    header = [h.strip() for h in rows[0]]
    column = next((i for i, h in enumerate(header) if h.lower() == "prompt"), None)
    if column is None:
        raise PromptSourceError(f"{path}: the header row has no 'Prompt' column (columns: {header})")
    items = []
    for n, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) <= column:
            raise PromptSourceError(f"{path}:{n}: {len(row)} column(s), the prompt is column {column + 1}")
        extra = {h: row[i] for i, h in enumerate(header) if i != column and i < len(row)}
        items.append(PromptItem(_check_prompt(row[column], f"{path}:{n}"), extra=extra))
    return items


def load_jsonl(path):
    items = []
    for n, line in enumerate(read_text(path, "prompt file").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptSourceError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise PromptSourceError(f"{where}: expected a JSON object with a 'prompt' field")
        prompt = _check_prompt(record.pop("prompt", None), where)
        seed = record.pop("seed", None)
        negative = record.pop("negative_prompt", None)
        if negative is not None and not isinstance(negative, str):
            raise PromptSourceError(f"{where}: negative_prompt must be a string, got {negative!r}")
        items.append(PromptItem(prompt, None if seed is None else _check_seed(seed, where), negative, record))
    return items


def load_coco_captions(path):
    try:
        data = json.loads(read_text(path, "COCO captions file"))
    except json.JSONDecodeError as e:
        raise PromptSourceError(f"{path}: invalid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list) \
            or not isinstance(data.get("images"), list):
        raise PromptSourceError(f"{path}: not a COCO captions file (expected 'images' and 'annotations' lists, as "
                                "in annotations/captions_val2017.json)")
    first = {}
    for a in data["annotations"]:
        try:
            key, image = (a["id"], a["image_id"]), a["image_id"]
            caption = a["caption"]
        except (KeyError, TypeError):
            raise PromptSourceError(f"{path}: an annotation lacks id / image_id / caption: {a!r}"[:300]) from None
        if image not in first or key < first[image][0]:
            first[image] = (key, caption)
    items = []
    for im in sorted(data["images"], key=lambda im: im["id"]):
        if im["id"] not in first:
            continue
        (ann_id, _), caption = first[im["id"]]
        items.append(PromptItem(_check_prompt(caption, f"{path}: caption {ann_id}"),
                                extra={"coco_image_id": im["id"], "coco_file_name": im.get("file_name"),
                                       "coco_caption_id": ann_id}))
    return items


def shapes_heldout(n_one=500, n_two=200):
    from eval.shapes_data import heldout_prompts
    return [PromptItem(s.caption, extra={"heldout_index": k}) for k, s in enumerate(heldout_prompts(n_one, n_two))]


def check_source(source):
    """Refuse an unknown kind of source before anything is read or loaded."""
    if source == SHAPES_HELDOUT:
        return
    ext = os.path.splitext(source)[1].lower()
    if ext not in FORMATS:
        raise PromptSourceError(f"prompt file {source!r}: unknown format {ext or '(no extension)'!r}; use "
                                f"{', '.join(FORMATS)} or {SHAPES_HELDOUT!r}")


def load_prompts(source):
    """PromptItems of a file (by its extension) or of the built-in `shapes-heldout` set."""
    check_source(source)
    if source == SHAPES_HELDOUT:
        return shapes_heldout()
    loader = {".txt": load_txt, ".tsv": load_tsv, ".jsonl": load_jsonl, ".json": load_coco_captions}
    items = loader[os.path.splitext(source)[1].lower()](source)
    if not items:
        raise PromptSourceError(f"prompt file {source!r} holds no prompts")
    return items
