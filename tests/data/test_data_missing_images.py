"""Missing images are found before training: counted and named, or dropped with --skip_missing_images;
a missing data root is named as the root."""

import os

import pytest

from data_helpers import write_image, write_json
from vchat.data import DataError, build_mixture
from vchat.errors import UserError


def minigpt4(root: str, present=(0, 2), n: int = 4) -> None:
    """cc_sbu_align with n annotations, images only for `present`."""
    for i in present:
        write_image(f"{root}/cc_sbu_align/image/{i}.jpg")
    write_json(f"{root}/cc_sbu_align/filter_cap.json",
               {"annotations": [{"image_id": str(i), "caption": f"c{i}"} for i in range(n)]})


def test_missing_images_are_counted_before_training(tmp_path):
    minigpt4(str(tmp_path))
    with pytest.raises(DataError, match=r"2 of 4 samples of dataset minigpt4 name missing images, first: "
                                        r".*cc_sbu_align/image/1\.jpg \(minigpt4\[1\]\); --skip_missing_images"):
        build_mixture(str(tmp_path), ["minigpt4"], verbose=False)


def test_skip_missing_images_drops_and_counts(tmp_path, capsys):
    minigpt4(str(tmp_path))
    mix = build_mixture(str(tmp_path), ["minigpt4"], skip_missing_images=True)
    assert len(mix) == 2
    assert sorted(os.path.basename(mix[i].images[0]) for i in range(2)) == ["0.jpg", "2.jpg"]
    assert mix.parts[0].reader.skipped == {"missing image file": 2}
    assert "skipped at load: {'missing image file': 2}" in capsys.readouterr().out


def test_all_images_missing_is_an_error_even_when_skipping(tmp_path):
    minigpt4(str(tmp_path), present=())
    os.makedirs(tmp_path / "cc_sbu_align" / "image", exist_ok=True)
    with pytest.raises(DataError, match=r"all 4 samples of dataset minigpt4 name missing images"):
        build_mixture(str(tmp_path), ["minigpt4"], verbose=False, skip_missing_images=True)


def test_ocr_vqa_missing_cover_is_counted_not_fatal_at_load(tmp_path):
    root = str(tmp_path)
    write_image(f"{root}/OCR_VQA/images/111.jpg", size=(20, 30))
    os.makedirs(f"{root}/OCR_VQA/images", exist_ok=True)
    write_json(f"{root}/OCR_VQA/dataset.json", {
        k: {"imageURL": f"http://x/{k}.jpg", "questions": ["Q?"], "answers": ["A"]} for k in ("111", "333")})
    with pytest.raises(DataError, match=r"1 of 2 samples of dataset ocr_vqa name missing images, first: .*333\.jpg"):
        build_mixture(root, ["ocr_vqa"], verbose=False)
    assert len(build_mixture(root, ["ocr_vqa"], verbose=False, skip_missing_images=True)) == 1


def test_missing_data_root_is_named(tmp_path):
    with pytest.raises(DataError, match=r"dataset minigpt4: the data root .*nowhere \(--data_path\) does not exist"):
        build_mixture(str(tmp_path / "nowhere"), ["minigpt4"], verbose=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match=r"the data root .*file \(--data_path\) is not a directory"):
        build_mixture(str(tmp_path / "file"), ["minigpt4"], verbose=False)


def test_trainer_flags_reach_the_check(tmp_path):
    """`--skip_missing_images` of the trainers' shared flags, through build_training_data."""
    from vchat.config import preset
    from vchat.data.pipeline import build_training_data
    from vchat.train_args import train_parser

    minigpt4(str(tmp_path))
    parser = train_parser("vchat train", "test", ("cosine",)).parser
    argv = ["--data_path", str(tmp_path), "--dataset_names", "minigpt4", "--output_dir", str(tmp_path / "o"),
            "--tokenizer", "unused.json"]
    with pytest.raises(DataError, match=r"2 of 4 samples of dataset minigpt4 name missing images"):
        build_training_data(parser.parse_args(argv), preset("tiny"), verbose=False)
    with pytest.raises(UserError, match="unused.json: no such tokenizer file"):  # past the data
        build_training_data(parser.parse_args(argv + ["--skip_missing_images"]), preset("tiny"), verbose=False)
