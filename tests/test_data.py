"""Tests of medvqa.data: official counts, traps, bad input, the synthetic generator, batches."""
import hashlib
import io
import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage

import medvqa.data.batches as data_batches
import medvqa.data.readers as data_readers
import medvqa.data.synthetic as data_synthetic
from medvqa.data.readers import DatasetError, load_split, normalize_answer


# ---------------------------------------------------------------- official formats on the shared copies
@pytest.mark.parametrize("name, split, language, expected", [
    ("vqa-rad", "train", "en", 3064), ("vqa-rad", "test", "en", 451),
    ("slake", "train", "en", 4919), ("slake", "validate", "en", 1053), ("slake", "test", "en", 1061),
    ("slake", "train", "zh", 4916), ("slake", "val", "zh", 1046), ("slake", "test", "zh", 1033),
    ("pathvqa", "train", "en", 19755), ("pathvqa", "val", "en", 6279), ("pathvqa", "test", "en", 6761),
])
def test_official_counts(shared_data, name, split, language, expected):
    records = load_split(name, split, language=language, missing_images="keep")
    assert len(records) == expected


def test_vqa_rad_traps_and_mevf(shared_data):
    osf = data_readers.load_vqa_rad(split="train", layout="osf")
    by_qid = {r.qid: r for r in osf}
    assert by_qid["0"].question == "Are regions of the brain infarcted?" and by_qid["0"].answer_type == "closed"
    assert len(osf) == 1797 and {r.extra["phrase_type"] for r in osf} == {"freeform", "para"}
    train = load_split("vqa-rad", "train")  # auto: the MEVF files, the 3,064 questions the papers train on
    assert len(data_readers.load_vqa_rad(split="train", layout="mevf")) == len(train) == 3064
    assert {r.extra["phrase_type"] for r in train} == {"freeform", "para", "frame"}
    for records in (osf, train):
        assert all(isinstance(r.answer, str) for r in records)
        assert sum(r.answer.isdigit() for r in records) >= 5  # integer answers became strings
        assert {r.answer_type for r in records} == {"open", "closed"}  # "CLOSED " was stripped
        assert all(r.image_path.is_file() for r in records)
    mevf_test, osf_test = (data_readers.load_vqa_rad(split="test", layout=l) for l in ("mevf", "osf"))
    assert sorted((r.image_id, r.question) for r in mevf_test) == sorted((r.image_id, r.question) for r in osf_test)
    with pytest.raises(ValueError, match="train, test"):
        load_split("vqa-rad", "val")


def test_slake_closed_is_not_only_yes_no(shared_data):
    closed = [r for r in load_split("slake", "train") if r.answer_type == "closed"]
    assert len(closed) == 1943
    assert any(normalize_answer(r.answer) not in ("yes", "no") for r in closed)


def test_pathvqa_missing_images_skip_and_error(shared_data):
    with pytest.warns(UserWarning, match=r"skipped \d+ of 19755 records"):
        train = load_split("pathvqa", "train", missing_images="skip")
    assert len(train) == 782 and len({r.image_id for r in train}) == 100
    with pytest.raises(DatasetError, match="missing image files"):
        load_split("pathvqa", "test", missing_images="error")
    with pytest.raises(DatasetError, match="all 6279 records point to missing images"):
        load_split("pathvqa", "val", missing_images="skip")
    closed = [r for r in train if r.answer_type == "closed"]
    assert closed and all(normalize_answer(r.answer) in ("yes", "no") for r in closed)


def test_vqa_rad_overlap_check(shared_data):
    test, osf = load_split("vqa-rad", "test"), data_readers.load_vqa_rad(split="train", layout="osf")
    assert len(data_readers.split_overlap(osf, test)) == 1  # one test question repeats a training question on the same image
    assert len({r.image_id for r in test} & {r.image_id for r in osf}) == 202
    mevf = load_split("vqa-rad", "train")  # its frame rephrasings coincide with 15 more test questions
    assert len(data_readers.split_overlap(mevf, test)) == 16 and len({r.image_id for r in test} & {r.image_id for r in mevf}) == 203


# ---------------------------------------------------------------- answer normalisation
@pytest.mark.parametrize("raw, expected", [
    ("Yes", "yes"), (" YES. ", "yes"), ("The liver", "liver"), ("Two", "2"), (3, "3"), ("2.5 cm", "2.5 cm"),
    ("X-Ray", "x-ray"), ("left, upper", "left upper"), ("a  mass!", "mass"), ("1,000", "1,000"), ("ｙｅｓ", "yes"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


# ---------------------------------------------------------------- bad input
def _slake_like(tmp_path: Path, rows, name="train.json") -> Path:
    root = tmp_path / "slake"
    (root / "imgs" / "xmlab1").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "imgs" / "xmlab1" / "source.jpg")
    text = rows if isinstance(rows, str) else json.dumps(rows)
    (root / name).write_text(text)
    return root


ROW = {"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is it?", "answer": "Yes", "q_lang": "en",
       "location": "Lung", "modality": "CT", "answer_type": "CLOSED", "base_type": "vqa", "content_type": "Organ",
       "triple": ["vhead", "_", "_"], "qid": 7}


def test_malformed_json_names_file_and_line(tmp_path):
    root = _slake_like(tmp_path, '[{"qid": 1,\n  "question": }]')
    with pytest.raises(DatasetError, match=r"train.json: malformed JSON at line 2"):
        data_readers.load_slake(root, "train")


def test_missing_field_names_record_and_field(tmp_path):
    row = dict(ROW)
    del row["answer"]
    with pytest.raises(DatasetError, match=r"train.json, record 7, field 'answer'"):
        data_readers.load_slake(_slake_like(tmp_path, [row]), "train")


def test_unknown_answer_type(tmp_path):
    with pytest.raises(DatasetError, match=r"record 7, field 'answer_type'.*MAYBE"):
        data_readers.load_slake(_slake_like(tmp_path, [dict(ROW, answer_type="MAYBE")]), "train")


def test_unknown_split_language_and_empty(tmp_path):
    root = _slake_like(tmp_path, [ROW])
    with pytest.raises(ValueError, match="train, val, test"):
        data_readers.load_slake(root, "dev")
    with pytest.raises(ValueError, match="'en', 'zh'"):
        data_readers.load_slake(root, "train", language="fr")
    with pytest.raises(DatasetError, match="no records for split 'train' and language 'zh'"):
        data_readers.load_slake(root, "train", language="zh")


def test_missing_image_error_or_counted_skip(tmp_path):
    root = _slake_like(tmp_path, [ROW, dict(ROW, qid=8, img_name="xmlab2/source.jpg")])
    with pytest.raises(DatasetError, match=r"1 records \(1 images\) point to missing image files.*record 8"):
        data_readers.load_slake(root, "train")
    with pytest.warns(UserWarning, match="skipped 1 of 2 records"):
        assert [r.qid for r in data_readers.load_slake(root, "train", missing_images="skip")] == ["7"]
    kept = data_readers.load_slake(root, "train", missing_images="keep")
    assert kept[1].image_path is None
    with pytest.raises(DatasetError, match="record 8, field 'image'"):
        data_batches.VQADataset(kept)[1]


def test_truncated_image_is_reported(tmp_path):
    root = _slake_like(tmp_path, [ROW])
    good = io.BytesIO()
    Image.new("RGB", (64, 64), "white").save(good, format="JPEG")
    (root / "imgs" / "xmlab1" / "source.jpg").write_bytes(good.getvalue()[:200])
    records = data_readers.load_slake(root, "train")
    with pytest.raises(DatasetError, match=r"source.jpg, record 7, field 'image': unreadable image"):
        data_readers.verify_images(records)
    with pytest.raises(DatasetError, match="unreadable image"):
        data_batches.VQADataset(records)[0]


def test_missing_dataset_folder_says_what_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no folder named vqa_rad.*osf.io/89kps"):
        load_split("vqa-rad", "train")


# ---------------------------------------------------------------- PathVQA pickles and HF parquet
class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/medvqa-pickle-exploit"),))


def _pathvqa_pkl(tmp_path: Path, payload) -> Path:
    folder = tmp_path / "pvqa" / "qas" / "train"
    folder.mkdir(parents=True)
    (folder / "train_qa.pkl").write_bytes(pickle.dumps(payload))
    (tmp_path / "pvqa" / "images" / "train").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "pvqa" / "images" / "train" / "train_0001.jpg")
    return tmp_path


def test_pathvqa_pickle_plain_data_loads(tmp_path):
    root = _pathvqa_pkl(tmp_path, [{"image": "train_0001", "question": "Is this a tumor?", "answer": "yes"},
                                   {"image": "train_0001", "question": "What is shown?", "answer": "a cyst"}])
    records = data_readers.load_pathvqa(root, "train", layout="pkl", missing_images="error")
    assert [(r.answer, r.answer_type) for r in records] == [("yes", "closed"), ("a cyst", "open")]


def test_pathvqa_pickle_with_code_is_refused(tmp_path):
    Path("/tmp/medvqa-pickle-exploit").unlink(missing_ok=True)
    root = _pathvqa_pkl(tmp_path, [{"image": "train_0001", "question": "q", "answer": _Exploit()}])
    with pytest.raises(DatasetError, match=r"train_qa.pkl: not a plain-data pickle.*refusing"):
        data_readers.load_pathvqa(root, "train", layout="pkl")
    assert not Path("/tmp/medvqa-pickle-exploit").exists()


def test_hf_parquet_export(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVQA_CACHE", str(tmp_path / "cache"))
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, format="JPEG")
    frame = pd.DataFrame({"image": [{"bytes": buf.getvalue(), "path": None}] * 2,
                          "question": ["is there a mass?", "what organ?"], "answer": ["no", "liver"]})
    (tmp_path / "data").mkdir()
    frame.to_parquet(tmp_path / "data" / "test-00000-of-00001.parquet")
    records = data_readers.load_hf_parquet(tmp_path, "vqa-rad", "test")
    assert [r.answer_type for r in records] == ["closed", "open"]
    assert records[0].image_path == records[1].image_path and records[0].image_path.is_file()
    with pytest.raises(DatasetError, match="no train-"):
        data_readers.load_hf_parquet(tmp_path, "vqa-rad", "train")


def test_download_offline_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="(?s)flaviagiammarino/vqa-rad.*internet"):
        data_readers.download("vqa-rad", tmp_path)


# ---------------------------------------------------------------- the synthetic generator
def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generator_is_deterministic(tmp_path, synthetic_dir):
    again = data_synthetic.generate_synthetic(tmp_path / "again", n_images=120, seed=3)
    assert _digest(again) == _digest(synthetic_dir)
    other = data_synthetic.generate_synthetic(tmp_path / "other", n_images=120, seed=4)
    assert _digest(other) != _digest(synthetic_dir)


def test_generator_layout_and_splits(synthetic_dir):
    splits = {s: load_split("synthetic", s, root=synthetic_dir) for s in ("train", "val", "test")}
    assert all(splits.values())
    images = {s: {r.image_id for r in rs} for s, rs in splits.items()}
    assert not (images["train"] & images["test"]) and not (images["train"] & images["val"])
    scenes = json.loads((synthetic_dir / "scenes.json").read_text())
    assert len(scenes) == 120 + 60  # and 60 balanced validation images (n_images // 2)
    split_of = {r.image_id: s for s, rs in splits.items() for r in rs}
    twins = [s for s in scenes if s["twin_of"] is not None]
    assert twins, "the generator must make near-duplicate twins"
    for twin in twins:  # a twin lands in its original's split and differs by exactly one lesion
        assert split_of[str(twin["image_id"])] == split_of[str(twin["twin_of"])]
        assert abs(len(twin["lesions"]) - len(scenes[twin["twin_of"]]["lesions"])) == 1
    kg = (synthetic_dir / "KG" / "en_disease.csv").read_text().splitlines()
    assert kg[0] == "disease#attribute#value" and all(len(line.split("#")) == 3 for line in kg)
    captions = json.loads((synthetic_dir / "captions.json").read_text())
    assert len(captions) == 180


def _components(codes: np.ndarray, code: int) -> list:
    labels, n = ndimage.label(codes == code, structure=np.ones((3, 3)))
    return ndimage.find_objects(labels)


@pytest.fixture(scope="module")
def optioned_dir(tmp_path_factory) -> Path:
    """The same generator with every option away from its default."""
    return data_synthetic.generate_synthetic(tmp_path_factory.mktemp("optioned") / "ds", n_images=120, seed=3,
                                   **data_synthetic.parse_synthetic_options("lesion_scale=0.5,knowledge_questions=1,labelled_fraction=0.3"))


def _kg_table(folder: Path, name: str) -> dict[tuple[str, str], list[str]]:
    table: dict[tuple[str, str], list[str]] = {}
    for line in (folder / "KG" / name).read_text().splitlines()[1:]:
        head, attribute, value = line.split("#")
        table.setdefault((head, attribute), []).append(value)
    return table


@pytest.mark.parametrize("folder_fixture", ["synthetic_dir", "optioned_dir"])
def test_answers_agree_with_what_is_drawn(folder_fixture, request):
    """Re-derive answers from the label masks (and lesion pixels, and the KG files) and compare them with the QA files."""
    synthetic_dir = request.getfixturevalue(folder_fixture)
    codes = {name: code for code, name in (line.split(":") for line in (synthetic_dir / "mask.txt").read_text().splitlines())}
    codes = {name: int(code) for name, code in codes.items()}
    names = {code: name for name, code in codes.items()}
    systems, diseases = _kg_table(synthetic_dir, "en_organ_rel.csv"), _kg_table(synthetic_dir, "en_disease.csv")
    checked, knowledge = 0, 0
    for split in ("train", "val", "test"):
        for r in load_split("synthetic", split, root=synthetic_dir):
            mask = np.asarray(Image.open(r.image_path.parent / "mask.png"))
            present = set(np.unique(mask).tolist())
            lesion_codes = [c for c in present if c >= 150]
            q = r.question
            if q == "How many lesions are in this image?":
                assert sum(len(_components(mask, c)) for c in lesion_codes) == int(r.answer), r
            elif q.startswith("Does the picture contain the "):
                organ = next(n for n in codes if n.lower() == q[len("Does the picture contain the "):-1])
                assert (codes[organ] in present) == (r.answer == "Yes"), r
            elif q == "Is this image abnormal?":
                assert bool(lesion_codes) == (r.answer == "Yes"), r
            elif q == "What abnormality is seen in this image?":
                assert codes[r.answer] in present, r
            elif q.startswith("Where is the "):
                finding = next(n for n in codes if n.lower() == q[len("Where is the "):-1])
                quadrants = set()
                for box in _components(mask, codes[finding]):
                    cy, cx = (box[0].start + box[0].stop) / 2 / mask.shape[0], (box[1].start + box[1].stop) / 2 / mask.shape[1]
                    quadrants.add(f"{'upper' if cy < 0.5 else 'lower'} {'left' if cx < 0.5 else 'right'}")
                assert r.answer in quadrants, r
            elif q.startswith("Is the ") and q.endswith(" large?"):
                finding = next(n for n in codes if n.lower() == q[len("Is the "):-len(" large?")])
                extent = max(max(b[0].stop - b[0].start, b[1].stop - b[1].start) for b in _components(mask, codes[finding]))
                assert (extent >= 14) == (r.answer == "Yes"), (r, extent)  # large: >= 15 px, small: <= 13 px
            elif q == "What usually causes the abnormality in this image?":  # the KG's cause of a drawn finding
                assert any(r.answer in diseases.get((names[c], "cause"), []) for c in lesion_codes), r
                knowledge += 1
            elif q == "Which body system does the abnormal organ belong to?":  # the KG's system of an organ around a lesion
                lesion = np.isin(mask, lesion_codes)
                ring = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
                around = {names[c] for c in np.unique(mask[ring]).tolist() if 0 < c < 150}
                assert any(r.answer in systems.get((organ, "belong to"), []) for organ in around), (r, around)
                knowledge += 1
            else:
                continue
            checked += 1
    assert checked > (500 if folder_fixture == "synthetic_dir" else 150)
    assert (knowledge > 20) == (folder_fixture == "optioned_dir")


def test_small_lesions_shrink_with_lesion_scale(synthetic_dir, optioned_dir):
    """lesion_scale=0.5 halves the small lesions as drawn in the masks (large lesions keep their size)."""
    def small_extents(folder: Path) -> list[int]:
        extents = []
        for scene in json.loads((folder / "scenes.json").read_text()):
            mask = np.asarray(Image.open(folder / "imgs" / f"synth{scene['image_id']}" / "mask.png"))
            for lesion in scene["lesions"]:
                if lesion["size"] == "small":
                    x, y = int(lesion["x"] * mask.shape[1]), int(lesion["y"] * mask.shape[0])
                    labels, _ = ndimage.label(mask >= 150, structure=np.ones((3, 3)))
                    if labels[y, x]:
                        box = ndimage.find_objects(labels == labels[y, x])[0]
                        extents.append(max(box[0].stop - box[0].start, box[1].stop - box[1].start))
        return extents
    plain, fine = small_extents(synthetic_dir), small_extents(optioned_dir)
    assert len(plain) > 20 and len(fine) > 20
    assert np.median(fine) <= 0.65 * np.median(plain), (np.median(fine), np.median(plain))


def test_knowledge_questions_only_add_questions(tmp_path):
    plain = data_synthetic.generate_synthetic(tmp_path / "plain", n_images=100, seed=7)
    extra = data_synthetic.generate_synthetic(tmp_path / "extra", n_images=100, seed=7, knowledge_questions=True)
    assert (plain / "captions.json").read_bytes() == (extra / "captions.json").read_bytes()
    for split in ("train", "val", "test"):
        key = lambda r: (r.image_id, r.question, r.answer)
        before = {key(r) for r in load_split("synthetic", split, root=plain)}
        after = load_split("synthetic", split, root=extra)
        added = [r for r in after if key(r) not in before]
        assert before <= {key(r) for r in after}  # every default question is still there, unchanged
        assert added and all(r.question_type == "KG" and r.answer_type == "open" for r in added)


def test_labelled_fraction_keeps_captions_and_held_out_splits(tmp_path):
    plain = data_synthetic.generate_synthetic(tmp_path / "plain", n_images=200, seed=2)
    few = data_synthetic.generate_synthetic(tmp_path / "few", n_images=200, seed=2, labelled_fraction=0.25)
    for name in ("validate.json", "test.json", "captions.json", "scenes.json"):  # only training questions go
        assert (plain / name).read_bytes() == (few / name).read_bytes(), name
    scenes = json.loads((plain / "scenes.json").read_text())
    group = {str(s["image_id"]): str(s["twin_of"] if s["twin_of"] is not None else s["image_id"]) for s in scenes}
    groups_plain = {group[r.image_id] for r in load_split("synthetic", "train", root=plain)}
    groups_few = {group[r.image_id] for r in load_split("synthetic", "train", root=few)}
    assert groups_few < groups_plain and len(groups_few) == round(0.25 * len(groups_plain))
    kept = {(r.image_id, r.question, r.answer) for r in load_split("synthetic", "train", root=plain) if group[r.image_id] in groups_few}
    assert {(r.image_id, r.question, r.answer) for r in load_split("synthetic", "train", root=few)} == kept
    unlabelled = data_synthetic.unlabelled_training_images(few)  # the rest of the training images, listed with their files
    train_plain = {r.image_id for r in load_split("synthetic", "train", root=plain)}
    assert set(unlabelled) == train_plain - {r.image_id for r in load_split("synthetic", "train", root=few)}
    assert all(path.is_file() for path in unlabelled.values()) and data_synthetic.unlabelled_training_images(plain) == {}


def test_synthetic_options_parse_and_name_their_folder():
    assert data_synthetic.parse_synthetic_options("") == {}
    assert data_synthetic.parse_synthetic_options(" twin_rate=0.15 , lesion_scale=0.5,knowledge_questions=1") == {
        "knowledge_questions": 1, "lesion_scale": 0.5}  # defaults dropped, sorted
    assert data_synthetic.synthetic_name(480, 0, "") == "synthetic-n480-seed0"
    assert data_synthetic.synthetic_name(480, 0, "labelled_fraction=0.25,lesion_scale=0.5") == "synthetic-n480-seed0-labelled_fraction0.25-lesion_scale0.5"
    with pytest.raises(ValueError, match="key=value with a key among"):
        data_synthetic.parse_synthetic_options("lesion=0.5")
    with pytest.raises(ValueError, match="lesion_scale='big' is not a float"):
        data_synthetic.parse_synthetic_options("lesion_scale=big")
    with pytest.raises(ValueError, match=r"labelled_fraction=0\.0 is outside"):
        data_synthetic.parse_synthetic_options("labelled_fraction=0")
    with pytest.raises(ValueError, match="knowledge_questions='0.5' is not an int"):
        data_synthetic.parse_synthetic_options("knowledge_questions=0.5")


def test_filled_lesions_have_their_finding_grey_level(synthetic_dir):
    """Where the mask says 'nodule' (a filled disk), the image is bright: the pixels carry the finding."""
    scenes = json.loads((synthetic_dir / "scenes.json").read_text())
    codes = {n: int(c) for c, n in (l.split(":") for l in (synthetic_dir / "mask.txt").read_text().splitlines())}
    seen = 0
    for scene in scenes:
        for finding in {l["finding"] for l in scene["lesions"]}:
            shape, grey = data_synthetic.FINDINGS[finding][2], data_synthetic.FINDINGS[finding][3]
            if shape not in ("disk", "square", "triangle", "diamond"):
                continue
            folder = synthetic_dir / "imgs" / f"synth{scene['image_id']}"
            mask, image = np.asarray(Image.open(folder / "mask.png")), np.asarray(Image.open(folder / "source.png"), float)
            inside = image[ndimage.binary_erosion(mask == codes[finding])]
            if inside.size:
                assert abs(inside.mean() - grey) < 45, (scene["image_id"], finding, inside.mean())
                seen += 1
    assert seen > 10


def test_synthetic_findings_are_long_tailed(tmp_path):
    folder = data_synthetic.generate_synthetic(tmp_path / "s", n_images=400, seed=0)
    scenes = json.loads((folder / "scenes.json").read_text())
    counts = pd.Series([s["lesions"][0]["finding"] for s in scenes if s["lesions"] and not s.get("balanced")]).value_counts()
    assert counts.iloc[0] >= 8 * counts.iloc[-1] and len(counts) >= 8


def test_balanced_validation_images_change_nothing_else(tmp_path):
    plain = data_synthetic.generate_synthetic(tmp_path / "plain", n_images=120, seed=5, balanced_validation=0)
    extra = data_synthetic.generate_synthetic(tmp_path / "extra", n_images=120, seed=5, balanced_validation=200)
    for split in ("train", "test"):  # byte-identical train and test splits
        assert (plain / f"{split}.json").read_bytes() == (extra / f"{split}.json").read_bytes()
    scenes = json.loads((extra / "scenes.json").read_text())
    balanced = [s for s in scenes if s.get("balanced")]
    assert len(scenes) == 120 + 200 and len(balanced) == 200 and all(s["lesions"] for s in balanced)
    val_ids = {r.image_id for r in load_split("synthetic", "val", root=extra)}
    assert {str(s["image_id"]) for s in balanced} <= val_ids  # validate only
    assert not val_ids & {r.image_id for r in load_split("synthetic", "train", root=extra)}
    # balanced: every finding type on exactly 20 images (the training findings span a 40x range)
    counts = pd.Series([s["lesions"][0]["finding"] for s in balanced]).value_counts()
    assert set(counts.index) == set(data_synthetic.FINDINGS) and set(counts) == {20}, counts.to_dict()
    assert all({l["finding"] for l in s["lesions"]} == {s["lesions"][0]["finding"]} for s in balanced)
    with pytest.raises(ValueError, match="balanced_validation"):
        data_synthetic.generate_synthetic(tmp_path / "bad", n_images=10, balanced_validation=-1)


# ---------------------------------------------------------------- torch dataset
def test_dataset_and_collate(synthetic_dir):
    records = load_split("synthetic", "train", root=synthetic_dir)
    vocab = data_batches.answer_vocabulary(records)
    ds = data_batches.VQADataset(records, vocab[:5], image_size=32, cache_images=True)
    batch = data_batches.collate_vqa([ds[i] for i in range(6)])
    assert batch["image"].shape == (6, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (6,)
    for i in range(6):
        expected = vocab[:5].index(normalize_answer(records[i].answer)) if normalize_answer(records[i].answer) in vocab[:5] else -100
        assert batch["label"][i].item() == expected
    assert ds[0]["image"] is ds.cache[records[0].image_path]
    with pytest.raises(ValueError, match="no records"):
        data_batches.VQADataset([])


def test_answer_vocabulary_order():
    recs = [data_readers.VQARecord("x", "train", str(i), "1", None, "q", a, "open") for i, a in enumerate(["b", "a", "B", "c", "a"])]
    assert data_batches.answer_vocabulary(recs) == ["a", "b", "c"]
    assert data_batches.answer_vocabulary(recs, min_count=2) == ["a", "b"]


def test_split_overlap_uses_image_and_normalised_question():
    mk = lambda qid, img, q: data_readers.VQARecord("x", "test", qid, img, None, q, "yes", "closed")
    train = [mk("1", "a", "Is there a mass?")]
    test = [mk("2", "a", "is there a MASS"), mk("3", "b", "Is there a mass?")]
    assert [r.qid for r in data_readers.split_overlap(train, test)] == ["2"]


def test_fixed_subset_depends_only_on_seed_and_keeps_order():
    records = [data_readers.VQARecord("toy", "train", str(i), str(i), None, f"q{i}", "a", "open", "") for i in range(50)]
    a, b = data_batches.fixed_subset(records, 10, seed=3), data_batches.fixed_subset(list(records), 10, seed=3)
    assert [r.qid for r in a] == [r.qid for r in b] and len(a) == 10
    assert [int(r.qid) for r in a] == sorted(int(r.qid) for r in a)  # original order
    assert [r.qid for r in data_batches.fixed_subset(records, 10, seed=4)] != [r.qid for r in a]
    assert data_batches.fixed_subset(records, 0, seed=3) == records and data_batches.fixed_subset(records, 99, seed=3) == records
    with pytest.raises(ValueError, match="n must be >= 0"):
        data_batches.fixed_subset(records, -1, seed=0)


def test_load_images_uses_the_encoders_statistics_and_names_a_broken_file(tmp_path):
    from PIL import Image
    Image.new("RGB", (30, 20), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    red = data_batches.load_image_files({"red": tmp_path / "red.png"}, 8, mean=(0.5, 0.0, 0.0), std=(0.25, 1.0, 1.0))["red"]
    assert red.shape == (3, 8, 8)
    assert torch.allclose(red[:, 0, 0], torch.tensor([2.0, 0.0, 0.0]))  # (1 - 0.5) / 0.25, (0 - 0) / 1, ...
    with pytest.raises(DatasetError, match=r"broken.jpg, record img7, field 'image': unreadable image"):
        data_batches.load_image_files({"img7": tmp_path / "broken.jpg"}, 8)
