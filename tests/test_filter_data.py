"""Tests for filter_data.py: readers, preprocessing, the three filtering steps (App. D.1, Sec. 5.2),
temperature scaling, App. D.3's Chernoff numbers, and the CLI on a small CelebA-format data set.

The fixture writes CelebA's layout in tmp_path: img_align_celeba/*.jpg (178 x 218), list_attr_celeba.txt
and list_eval_partition.txt. Each image is a face-shaped ellipse on a grey background; its brightness
is a known continuous attribute `level`: 40% dark (level in [0, 0.15], labelled not Smiling), 40%
bright ([0.85, 1], Smiling) and 20% exactly in the middle (level 0.5, the background's grey) with a
RANDOM label -- CelebA's mild faces with arbitrary binary labels. A label-only split would keep them;
the filter must not. The pixel noise comes from a pool of 4 patterns: with a fresh pattern per image,
the tiny CNN memorised the middle images' random labels (measured: p from 0.01 to 0.99 on them).
"""
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import ENV, ROOT
import filter_data as fd
import plumbing

NAMES = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair "
         "Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup "
         "High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose "
         "Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat "
         "Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young").split()
# Tiny classifiers for the fixture, 3-5 s each on one shared core. With these, seeds 0-3 all removed every
# middle image and kept every extreme; at lr 1e-2 the step-1 classifier of 2 seeds in 4 gave some
# extremes of one side only p(y|x) = 0.82-0.86 after 100 steps (below tau1 = 0.9).
TINY = ["--steps", "100", "--batch", "32", "--width", "8", "--lr", "3e-3", "--workers", "1", "--threads", "1"]


def make_celeba(root, n=240, seed=0):
    """Write a CelebA-format data set; return its truth: files, level, label, split, kind (0 dark, 1 bright, 2 middle)."""
    rng = np.random.default_rng(seed)
    kind = rng.permutation(np.repeat([0, 1, 2], [2 * n // 5, 2 * n // 5, n - 4 * n // 5]))
    level = np.where(kind == 0, rng.uniform(0, 0.15, n), np.where(kind == 1, rng.uniform(0.85, 1, n), 0.5))
    label = np.where(kind == 2, rng.integers(0, 2, n), kind)
    split = rng.choice(3, n, p=[0.7, 0.15, 0.15])
    os.makedirs(os.path.join(root, "img_align_celeba"))
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    pool = rng.normal(0, 20, (4, 218, 178, 3))
    face = np.zeros((218, 178), np.uint8)
    cv2.ellipse(face, (89, 109), (45, 58), 0, 0, 360, 1, -1)
    for i, f in enumerate(files):
        img = np.full((218, 178, 3), 125.0)              # = 30 + 190 * 0.5: a middle face is invisible
        img[face == 1] = 30 + 190 * level[i]
        img += pool[i % 4]
        cv2.imwrite(os.path.join(root, "img_align_celeba", f), np.clip(img, 0, 255).astype(np.uint8))
    values = rng.choice([-1, 1], (n, 40))
    values[:, NAMES.index("Smiling")] = 2 * label - 1
    with open(os.path.join(root, "list_attr_celeba.txt"), "w") as fh:   # CelebA's own spacing
        fh.write(f"{n}\n" + " ".join(NAMES) + " \n")
        fh.writelines(f + " " + " ".join(f"{x:2d}" for x in v) + "\n" for f, v in zip(files, values))
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as fh:
        fh.writelines(f"{f} {s}\n" for f, s in zip(files, split))
    return dict(files=files, level=level, label=label, split=split, kind=kind, values=values)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One filtering run at tiny size on the 240-image fixture, default thresholds (tau1 0.9, tau2 0.99)."""
    base = tmp_path_factory.mktemp("celeba")
    truth = make_celeba(str(base / "celeba"))
    out = str(base / "out")
    threads = torch.get_num_threads()
    with contextlib.redirect_stdout(io.StringIO()) as text:   # the printed lines (capsys is per test)
        counts = fd.main(["--data", "celeba", "--root", str(base / "celeba"), "--attr", "Smiling", "--out", out, *TINY])
    torch.set_num_threads(threads)
    return dict(base=base, out=out, truth=truth, counts=counts, index=fd.read_index(os.path.join(out, "index.csv")),
                stdout=text.getvalue())


def cli(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "filter_data.py"), *args], capture_output=True,
                          text=True, env=ENV, cwd=ROOT, timeout=120)


# ---------------------------------------------------------------- readers and preprocessing

def test_celeba_reader_parses_attributes_and_partition_exactly(tmp_path):
    truth = make_celeba(str(tmp_path), n=30)
    names, files, values = fd.read_celeba_attributes(str(tmp_path / "list_attr_celeba.txt"))
    assert names == NAMES and files == truth["files"] and values.dtype == np.int8
    assert np.array_equal(values, truth["values"])
    assert fd.read_celeba_partition(str(tmp_path / "list_eval_partition.txt")) == dict(zip(truth["files"], truth["split"]))
    d = fd.celeba_dataset(str(tmp_path), "Smiling")
    assert d["class_names"] == ["not Smiling", "Smiling"] and d["crop"] == "celeba"
    assert np.array_equal(d["labels"], truth["label"]) and np.array_equal(d["splits"], truth["split"])
    assert d["paths"][4] == os.path.abspath(str(tmp_path / "img_align_celeba" / "000005.jpg"))
    # a pair: class 0 = Blond_Hair only, class 1 = Black_Hair only, -1 = both or neither
    pair = fd.celeba_dataset(str(tmp_path), "Blond_Hair,Black_Hair")
    blond, black = truth["values"][:, NAMES.index("Blond_Hair")] == 1, truth["values"][:, NAMES.index("Black_Hair")] == 1
    expected = [0 if b and not k else 1 if k and not b else -1 for b, k in zip(blond, black)]
    assert pair["labels"].tolist() == expected and pair["class_names"] == ["Blond_Hair", "Black_Hair"]


def test_attribute_file_errors_name_the_file_and_line(tmp_path):
    make_celeba(str(tmp_path), n=5)
    path = tmp_path / "list_attr_celeba.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:3] + [lines[3].replace("-1", " 0", 1)] + lines[4:]) + "\n")
    with pytest.raises(fd.DataError, match=r"list_attr_celeba.txt: line 4 must be"):
        fd.read_celeba_attributes(str(path))
    path.write_text("\n".join(["6"] + lines[1:]) + "\n")
    with pytest.raises(fd.DataError, match="announces 6 images, the file lists 5"):
        fd.read_celeba_attributes(str(path))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(fd.DataError, match="unknown attribute 'Smilling'; valid: 5_o_Clock_Shadow, .*Young"):
        fd.celeba_dataset(str(tmp_path), "Smilling")


def test_preprocess_celeba_centre_crop_and_area_resize():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)
    out = fd.preprocess(rgb, "celeba", 64)
    # the centre 140 x 140: rows 39..178, columns 19..158; INTER_AREA
    expected = cv2.resize(rgb[39:179, 19:159], (64, 64), interpolation=cv2.INTER_AREA)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and np.array_equal(out, expected)
    with pytest.raises(ValueError, match="is 178x200, expected CelebA's aligned 178x218"):
        fd.preprocess(rgb[:200], "celeba", 64)
    # generic: centre square crop of a 100 x 80 (H x W) image: rows 10..89
    assert np.array_equal(fd.preprocess(rgb[:100, :80], "square", 64),
                          cv2.resize(rgb[10:90, :80], (64, 64), interpolation=cv2.INTER_AREA))
    # smaller than the target: the centre 50 x 50 of a 50 x 80 image, enlarged with INTER_CUBIC
    assert np.array_equal(fd.preprocess(rgb[:50, :80], "square", 64),
                          cv2.resize(rgb[:50, 15:65], (64, 64), interpolation=cv2.INTER_CUBIC))


def test_read_rgb_takes_any_mode_pillow_reads(tmp_path):
    from PIL import Image
    grey = np.arange(48 * 48, dtype=np.uint8).reshape(48, 48)
    cases = {"grey.png": Image.fromarray(grey, "L"), "rgb.jpg": Image.fromarray(np.stack([grey] * 3, -1), "RGB")}
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., 0], rgba[:24, :, 3] = 200, 255                     # red, top half opaque, bottom half transparent
    cases["rgba.png"] = Image.fromarray(rgba, "RGBA")
    cases["palette.png"] = Image.fromarray(np.stack([grey] * 3, -1), "RGB").convert("P", palette=Image.ADAPTIVE)
    for name, im in cases.items():
        im.save(tmp_path / name)
    read = {name: fd.read_rgb((tmp_path / name).read_bytes()) for name in cases}
    assert all(a.shape == (48, 48, 3) and a.dtype == np.uint8 for a in read.values())
    assert np.array_equal(read["grey.png"], np.stack([grey] * 3, -1))          # grey -> three equal channels
    assert (read["rgba.png"][:24] == (200, 0, 0)).all()                          # opaque: its colour
    assert (read["rgba.png"][24:] == 255).all()                                  # transparent: over white
    assert np.array_equal(read["palette.png"], np.stack([grey] * 3, -1))        # 256 greys fit a palette exactly
    with pytest.raises(Exception):
        fd.read_rgb(b"not an image")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    assert "is not an image Pillow can read" in fd._decode(str(tmp_path / "bad.png"), "square", 32)


def test_cache_is_built_once_reused_and_keyed_by_content(tmp_path, monkeypatch, capsys):
    make_celeba(str(tmp_path / "c"), n=6)
    d = fd.celeba_dataset(str(tmp_path / "c"), "Smiling")
    images, path, hashes = fd.cached_images(d["paths"], "celeba", 64, str(tmp_path / "cache"), workers=2)
    direct = np.stack([fd.preprocess(cv2.imread(p)[:, :, ::-1], "celeba", 64) for p in d["paths"]])
    assert images.shape == (6, 64, 64, 3) and np.array_equal(images, direct)
    assert os.path.isfile(path) and os.path.isfile(path[:-4] + ".json") and len(set(hashes)) == 6
    decode = fd._decode
    monkeypatch.setattr(fd, "_decode", lambda *a: pytest.fail("a cached image was decoded again"))
    again, path2, hashes2 = fd.cached_images(d["paths"], "celeba", 64, str(tmp_path / "cache"))
    assert path2 == path and np.array_equal(again, images) and hashes2 == hashes
    # Replace one image under the same name: its bytes changed, so it (and only it) is read again.
    monkeypatch.setattr(fd, "_decode", decode)
    shutil.copyfile(d["paths"][1], d["paths"][4])
    capsys.readouterr()
    changed, _, hashes3 = fd.cached_images(d["paths"], "celeba", 64, str(tmp_path / "cache"))
    assert "1 changed since it was built" in capsys.readouterr().out
    assert np.array_equal(changed[4], images[1]) and hashes3[4] == hashes[1] and hashes3[:4] == hashes[:4]


def test_folder_and_csv_readers(tmp_path):
    for name, count in (("smile", 12), ("neutral", 8)):
        os.makedirs(tmp_path / "f" / name)
        for i in range(count):
            cv2.imwrite(str(tmp_path / "f" / name / f"{i}.png"), np.full((90, 70, 3), 10 * i, np.uint8))
    (tmp_path / "f" / "notes.txt").write_text("ignored: not a folder")
    d = fd.folder_dataset(str(tmp_path / "f"), seed=3)
    assert d["class_names"] == ["neutral", "smile"] and d["crop"] == "square"   # sorted folder names -> 0, 1
    assert np.bincount(d["labels"]).tolist() == [8, 12] and np.bincount(d["splits"]).tolist() == [16, 2, 2]
    assert d["paths"][0].endswith(os.path.join("neutral", "0.png"))
    images, _, _ = fd.cached_images(d["paths"], d["crop"], 64, str(tmp_path / "cache"))
    three = list(d["paths"]).index(os.path.abspath(str(tmp_path / "f" / "smile" / "3.png")))
    assert d["labels"][three] == 1 and images[three].min() == images[three].max() == 30   # uniformly 30
    # CSV: header, relative paths, string labels, explicit splits
    rows = ["path,label,split"] + [f"f/smile/{i}.png,yes,{('train', 'val', 'test')[i % 3]}" for i in range(6)] + \
           [f"f/neutral/{i}.png,no,train" for i in range(4)]
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    c = fd.csv_dataset(str(tmp_path / "list.csv"))
    assert c["class_names"] == ["no", "yes"] and c["labels"].tolist() == [1] * 6 + [0] * 4
    assert c["splits"].tolist() == [0, 1, 2, 0, 1, 2, 0, 0, 0, 0]
    assert c["paths"][0] == os.path.abspath(str(tmp_path / "f" / "smile" / "0.png"))
    (tmp_path / "bad.csv").write_text("a.png,x,train\nb.png,y,dev\n")
    with pytest.raises(fd.DataError, match=r"bad.csv: line 2: split 'dev' is not one of train, val, test"):
        fd.csv_dataset(str(tmp_path / "bad.csv"))
    (tmp_path / "mixed.csv").write_text("a.png,x,train\nb.png,y\n")
    with pytest.raises(fd.DataError, match=r"mixed.csv: line 2 has no split column"):
        fd.csv_dataset(str(tmp_path / "mixed.csv"))
    (tmp_path / "one.csv").write_text("a.png,x\nb.png,x\n")
    with pytest.raises(fd.DataError, match="expected exactly two distinct labels, found 1"):
        fd.csv_dataset(str(tmp_path / "one.csv"))
    os.makedirs(tmp_path / "f" / "third")
    with pytest.raises(fd.DataError, match=r"expected two class folders, found 3 \(neutral, smile, third\); pick two "
                                           "with --classes A,B"):
        fd.folder_dataset(str(tmp_path / "f"))
    assert fd.folder_dataset(str(tmp_path / "f"), classes=["smile", "neutral"])["class_names"] == ["neutral", "smile"]
    with pytest.raises(fd.DataError, match="--classes: .* has no class folder 'cats'"):
        fd.folder_dataset(str(tmp_path / "f"), classes=["smile", "cats"])


def test_too_few_images_per_class_is_refused_with_the_number_needed(tmp_path):
    assert fd.min_per_class(5) == 25 and fd.min_per_class(2) == 10    # ceil(4 members / 0.8)
    for name, count in (("a", 30), ("b", 24)):
        os.makedirs(tmp_path / "f" / name)
        for i in range(count):
            cv2.imwrite(str(tmp_path / "f" / name / f"{i}.png"), np.full((8, 8, 3), i, np.uint8))
    args = fd.parse_args(["--data", "folder", "--root", str(tmp_path / "f"), "--out", str(tmp_path / "o")])
    with pytest.raises(fd.DataError, match="class 'b' has 24 images; the filter needs at least 25 per class"):
        fd.read_dataset(args)


def test_auto_precision_is_bf16_only_where_the_gpu_has_it(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "o")
    base = ["--data", "folder", "--root", str(tmp_path / "f"), "--out", str(tmp_path / "o")]
    assert fd.parse_args(base).precision == "fp32"                                   # the CPU
    monkeypatch.setattr(plumbing, "check_device", lambda device: torch.device("cuda"))
    for native, expected in ((True, "bf16"), (False, "fp16")):                      # Ampere or later / older
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native)
        assert fd.parse_args(base).precision == expected


# ---------------------------------------------------------------- the steps, calibration, leakage

def test_disjoint_subsets_are_disjoint_and_cover():
    parts = fd.disjoint_subsets(103, 5, seed=1)
    assert len(parts) == 5 and sorted(len(p) for p in parts) == [20, 20, 21, 21, 21]
    allidx = np.concatenate(parts)
    assert len(allidx) == 103 and np.array_equal(np.sort(allidx), np.arange(103))   # disjoint and covering
    assert not all(np.array_equal(p, np.arange(p[0], p[0] + len(p))) for p in parts)  # random, not blocks


def test_p_of_label_and_keep_confident():
    logits = np.array([[0.0, 0.0], [0.0, 3.0], [5.0, -20.0], [1.0, 2.0]])
    labels = np.array([1, 1, 0, 0])
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = [0.5, sig(3.0), sig(25.0), sig(-1.0)]
    assert np.allclose(fd.p_of_label(logits, labels), expected, rtol=1e-15, atol=0)
    assert np.allclose(fd.p_class1(logits, temperature=2.0), [0.5, sig(1.5), sig(-12.5), sig(0.5)], rtol=1e-15)
    assert fd.keep_confident(logits, labels, 0.9).tolist() == [False, True, True, False]
    # precision: p(y = 0) for a margin of 40 is 1 - 4.2e-18, which 1 - p_class1 would round differently
    assert fd.p_of_label(np.array([[0.0, -40.0]]), np.array([1]))[0] == pytest.approx(math.exp(-40), rel=1e-12)


def test_rank_extremes_keeps_exactly_k_per_side():
    rng = np.random.default_rng(0)
    scores, labels = rng.uniform(size=50), (np.arange(50) % 3 == 0).astype(int)   # 17 of class 1, 33 of 0
    keep = fd.rank_extremes(scores, labels, (5, 4))
    assert np.bincount(labels[keep]).tolist() == [5, 4]
    s0, s1 = np.sort(scores[labels == 0]), np.sort(scores[labels == 1])
    assert np.array_equal(np.sort(scores[keep & (labels == 0)]), s0[:5])       # the 5 lowest of class 0
    assert np.array_equal(np.sort(scores[keep & (labels == 1)]), s1[-4:])      # the 4 highest of class 1
    assert fd.rank_extremes(scores, labels, (100, 2)).sum() == 33 + 2           # a short side keeps all
    assert fd.rank_extremes(scores, labels, None).all()


def test_temperature_scaling_lowers_validation_nll():
    """Guo et al. 2017: an over-confident model (logits x 4 the true ones) gets T ~ 4 and a lower NLL."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 4000)
    labels = (rng.uniform(size=4000) < 1 / (1 + np.exp(-z))).astype(int)
    logits = np.stack([np.zeros_like(z), 4 * z], axis=1)
    cal = fd.calibrate(logits, labels)
    assert cal["temperature"] == pytest.approx(4.0, rel=0.1)
    assert cal["nll_after"] < cal["nll_before"] - 0.2 and cal["ece_after"] < cal["ece_before"] / 3
    torch_nll = F.cross_entropy(torch.tensor(logits) / cal["temperature"], torch.tensor(labels)).item()
    assert cal["nll_after"] == pytest.approx(torch_nll, rel=1e-9)


@pytest.mark.parametrize("fitted, why", [(float("nan"), "diverged"), (float("inf"), "diverged"), (0.05, "worse")])
def test_temperature_scaling_keeps_t1_when_the_fit_diverges_or_hurts(monkeypatch, fitted, why):
    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 500)
    labels = (rng.uniform(size=500) < 1 / (1 + np.exp(-z))).astype(int)
    logits = np.stack([np.zeros_like(z), z], axis=1)                     # calibrated already: T = 1 is right
    monkeypatch.setattr(fd.classifier, "fit_temperature", lambda *a, **k: fitted)
    cal = fd.calibrate(logits, labels)
    assert cal["temperature"] == 1.0 and why in cal["kept_t1"]
    assert cal["nll_after"] == cal["nll_before"] == pytest.approx(fd.nll(logits, labels, 1.0))
    monkeypatch.setattr(fd.classifier, "fit_temperature", lambda *a, **k: 2.0)  # a fit that helps is used
    cal = fd.calibrate(2 * logits, labels)                               # over-confident by 2
    assert cal["kept_t1"] is None and cal["temperature"] == 2.0 and cal["nll_after"] < cal["nll_before"]


def test_chernoff_reproduces_app_d3():
    """App. D.3: p = 0.15^5, n = 60k: P(X >= 10) ~ 0.089, P(X >= 15) ~ 5e-4, P(X >= 20) ~ 7.2e-7."""
    n, p = 60000, 0.15 ** 5
    assert fd.chernoff_tail(n, p, 10) == pytest.approx(0.089, rel=0.01)
    assert 5e-4 <= fd.chernoff_tail(n, p, 15) < 6e-4            # 5.93e-4: the paper's 5e-4 is cut to one digit
    assert fd.chernoff_tail(n, p, 20) == pytest.approx(7.2e-7, rel=0.01)
    mu = n * p                                                  # the Poisson form (e mu / k)^k e^-mu agrees
    for k in (10, 15, 20):
        assert fd.chernoff_tail(n, p, k) == pytest.approx((math.e * mu / k) ** k * math.exp(-mu), rel=0.005)
        exact = 1 - sum(math.comb(n, j) * p ** j * (1 - p) ** (n - j) for j in range(k))
        assert fd.binomial_tail(n, p, k) == pytest.approx(exact, rel=1e-6)
        assert fd.binomial_tail(n, p, k) < fd.chernoff_tail(n, p, k)   # it is a bound
    assert fd.chernoff_tail(n, p, 4) == 1.0                     # k <= np: no bound
    assert fd.leakage_estimate(100, 1.0)["chernoff"]["10"] == fd.binomial_tail(100, 0.0, 10) == 0.0   # perfect members
    est = fd.leakage_estimate(n, 0.85)
    assert est["p"] == pytest.approx(0.15 ** 5, rel=1e-12) and est["chernoff"]["10"] == pytest.approx(fd.chernoff_tail(n, p, 10), rel=1e-9)


# ---------------------------------------------------------------- end to end

def test_filter_keeps_only_true_extremes(run):
    ix, truth, out = run["index"], run["truth"], run["out"]
    kind = truth["kind"][ix["row"]]
    train = ix["split"] == "train"
    # meaningful: the middle images sit in the training split with BOTH labels, so labels alone keep them
    assert set(ix["label"][train & (kind == 2)]) == {0, 1} and (train & (kind == 2)).sum() >= 30
    assert ix["kept"][kind == 2].sum() == 0                                   # not one middle image survives
    passed = np.isin(ix["reason"], ("kept", "rank"))                          # through steps 1 and 2
    assert passed[train & (kind < 2)].mean() >= 0.95 and passed[kind == 2].sum() == 0   # nearly every clear extreme
    assert ix["kept"][~train].sum() == 0 and set(ix["reason"][~train]) == {"split"}
    assert np.array_equal(ix["label"], truth["label"][ix["row"]]) and len(ix["row"]) == 240
    # every kept image passed both thresholds (defaults tau1 0.9, tau2 0.99) for its label
    k = ix["kept"] == 1
    p_y = lambda p: np.where(ix["label"] == 1, p, 1 - p)  # noqa: E731
    assert (p_y(ix["p_step1"])[k] > 0.9).all()
    for m in range(1, 6):
        assert (p_y(ix[f"p_ensemble{m}"])[k] > 0.99).all()
    assert np.isnan(ix["p_ensemble1"][ix["reason"] == "step1"]).all()          # members score the step-1 set only
    counts = json.loads(open(os.path.join(out, "counts.json")).read())
    per_side = [round(0.35 * n) for n in counts["train"]]                    # --subset auto: 35% of each class
    assert counts["kept"] == np.bincount(ix["label"][k]).tolist() == per_side == counts["per_side"]
    assert counts["rank"] == "ensemble"                                       # by the six classifiers' mean margin
    assert counts["train"] == np.bincount(ix["label"][train]).tolist()
    for name in ("kept_hist.png", "reliability.png", "kept_grid.png"):
        assert open(os.path.join(out, name), "rb").read(4) == b"\x89PNG"
    ev = json.loads(open(os.path.join(out, "evaluation.json")).read())
    assert ev["nll_after"] <= ev["nll_before"] and ev["test_accuracy"] > 0.75     # the test split's middle images are coin flips
    leak = json.loads(open(os.path.join(out, "leakage.json")).read())["paper_worst_case"]
    assert leak["n"] == k.sum() and leak["chernoff"]["10"] == pytest.approx(fd.chernoff_tail(k.sum(), 0.15 ** 5, 10))


def test_leakage_json_names_its_accuracy_source(run):
    """App. D.3 wants the members' accuracy; "measured" uses the evaluation classifier's and says so."""
    out, k = run["out"], int((run["index"]["kept"] == 1).sum())
    leak = json.loads(open(os.path.join(out, "leakage.json")).read())
    test_accuracy = json.loads(open(os.path.join(out, "evaluation.json")).read())["test_accuracy"]
    measured, worst = leak["measured"], leak["paper_worst_case"]
    assert measured["accuracy"] == test_accuracy and worst["accuracy"] == 0.85
    assert measured["n"] == worst["n"] == k and measured["members"] == 5
    assert measured["p"] == pytest.approx((1 - test_accuracy) ** 5, rel=1e-12)
    assert measured["chernoff"] == fd.leakage_estimate(k, test_accuracy)["chernoff"]
    assert measured["accuracy_source"].startswith("evaluation classifier's test accuracy, standing in for the ensemble members'")
    assert worst["accuracy_source"].startswith("assumed: the paper's worst case, 85% per member")
    line = next(x for x in run["stdout"].splitlines() if x.startswith("leakage (measured"))
    assert f"accuracy {test_accuracy:.3f} = evaluation classifier's test accuracy, standing in" in line


def test_evaluate_classify_scores_samples_with_the_evaluation_classifier(run, tmp_path):
    """`python evaluate.py classify`: metrics.json = histogram_metrics(score_images(the same images))."""
    import evaluate
    out = run["out"]
    ckpt_path = os.path.join(out, "classifiers", "evaluation.pt")
    kept = fd.load_kept(out, oversample=False)["images"]
    noise = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)   # a spread of scores
    images = np.concatenate([kept[:10], noise])
    np.savez(tmp_path / "s.npz", images=images)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "classify", "--samples", str(tmp_path / "s.npz"),
                        "--classifier", ckpt_path, "--out", str(tmp_path / "e")],
                       capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    model, _ = fd.load_attribute_classifier(ckpt_path)
    scores = fd.score_images(model, images)                                   # recomputed here, not read back
    assert np.allclose(np.load(tmp_path / "e" / "scores.npy"), scores, rtol=0, atol=1e-9)
    expected = evaluate.histogram_metrics(scores)
    got = json.loads(open(tmp_path / "e" / "metrics.json").read())
    assert got["n"] == 16 and got["bins"] == 100
    for name in ("unit", "data"):
        assert got[name]["counts"] == expected[name]["counts"].tolist() and sum(got[name]["counts"]) == 16
        assert got[name]["mse"] == pytest.approx(expected[name]["mse"], rel=1e-9)
        assert got[name]["kld"] == pytest.approx(expected[name]["kld"], rel=1e-9)
        assert got[name]["range"] == pytest.approx(list(expected[name]["range"]), rel=1e-9)
    assert got["unit"]["range"] == [0.0, 1.0]
    assert open(tmp_path / "e" / "score_hist.png", "rb").read(4) == b"\x89PNG"
    # a bad --classifier: one line, non-zero exit, nothing written
    for bad, message in ((str(tmp_path / "missing.pt"), "does not exist"), (str(tmp_path / "s.npz"), "is unreadable")):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "classify", "--samples",
                            str(tmp_path / "s.npz"), "--classifier", bad, "--out", str(tmp_path / "bad")],
                           capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=120)
        assert r.returncode != 0 and message in r.stderr and bad in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "bad")


def test_kept_images_load_and_score_back(run):
    ix, out = run["index"], run["out"]
    data = fd.load_kept(out)
    k = np.flatnonzero(ix["kept"] == 1)
    assert data["images"].shape == (len(k), 64, 64, 3) and data["images"].dtype == np.uint8
    assert np.array_equal(data["labels"], ix["label"][k])
    direct = np.stack([fd.preprocess(cv2.imread(p)[:, :, ::-1], "celeba", 64) for p in ix["path"][k[:5]]])
    assert np.array_equal(data["images"][:5], direct)                          # the cache holds the decoded faces
    model, ckpt = fd.load_attribute_classifier(os.path.join(out, "classifiers", "evaluation.pt"))
    assert ckpt["model_config"]["width"] == 8 and float(model.temperature) == ckpt["calibration"]["temperature"]
    scores = fd.score_images(model, data["images"])
    assert scores.min() >= 0 and scores.max() <= 1
    assert np.allclose(scores, ix["p_eval"][k], rtol=0, atol=1e-6)            # the index holds calibrated scores
    import evaluate
    assert np.allclose(evaluate.classifier_scores(data["images"], os.path.join(out, "classifiers", "evaluation.pt")),
                       scores, rtol=0, atol=1e-12)


def test_resume_ranks_k_per_side_without_retraining(run, tmp_path, capsys):
    out = str(tmp_path / "out")
    shutil.copytree(run["out"], out)
    stamps = {f: os.path.getmtime(os.path.join(out, "classifiers", f)) for f in os.listdir(os.path.join(out, "classifiers"))}
    counts = fd.main(["--data", "celeba", "--root", str(run["base"] / "celeba"), "--attr", "Smiling", "--out", out,
                      *TINY, "--per-side", "20,15", "--oversample", "2,1", "--overwrite"])   # new step 3
    text = capsys.readouterr().out
    assert text.count("finished earlier: reusing") == 7 and "training on" not in text
    assert stamps == {f: os.path.getmtime(os.path.join(out, "classifiers", f)) for f in stamps}
    ix = fd.read_index(os.path.join(out, "index.csv"))
    k = ix["kept"] == 1
    assert counts["kept"] == [20, 15] == np.bincount(ix["label"][k]).tolist()
    passed = ix["reason"] != "step1"
    for c, side in ((0, slice(None, 20)), (1, slice(-15, None))):             # the most extreme by --rank
        candidates = np.sort(ix["rank_score"][passed & (ix["split"] == "train") & (ix["label"] == c)])
        assert np.array_equal(np.sort(ix["rank_score"][k & (ix["label"] == c)]), candidates[side])
    assert set(ix["repeat"][k & (ix["label"] == 0)]) == {2} and set(ix["repeat"][~k]) == {0}
    assert len(fd.load_kept(out)["labels"]) == 2 * 20 + 15 and len(fd.load_kept(out, oversample=False)["labels"]) == 35


def write_two_class_csv(folder, rows=None, shape=(80, 100, 3), noise=20):
    """60 images in folder, dark (even i) and bright (odd i), and data.csv `i.png,label,split` with
    rows 0-39 train, 40-49 val, 50-59 test. Given rows (the list this returns), rewrites only the CSV."""
    if rows is None:
        rng = np.random.default_rng(0)
        rows = []
        for i in range(60):
            img = np.clip(rng.normal(60 + 140 * (i % 2), noise, shape), 0, 255).astype(np.uint8)
            cv2.imwrite(str(folder / f"{i}.png"), img)
            rows.append([f"{i}.png", "bright" if i % 2 else "dark", "train" if i < 40 else "val" if i < 50 else "test"])
    (folder / "data.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")
    return rows


def test_generic_csv_layout_end_to_end(tmp_path):
    write_two_class_csv(tmp_path)
    counts = fd.main(["--data", "csv", "--csv", str(tmp_path / "data.csv"), "--out", str(tmp_path / "out"),
                      "--steps", "40", "--batch", "16", "--width", "8", "--lr", "3e-3", "--tau1", "0.6", "--tau2", "0.6",
                      "--threads", "1", "--size", "32"])
    ix = fd.read_index(str(tmp_path / "out" / "index.csv"))
    assert counts["class_names"] == ["bright", "dark"] and counts["train"] == [20, 20]
    assert len(ix["path"]) == 60 and set(ix["split"][40:50]) == {"val"} and ix["kept"].sum() == sum(counts["kept"]) > 0
    assert fd.load_kept(str(tmp_path / "out"))["images"].shape[1:] == (32, 32, 3)                 # --size 32


def test_swapped_val_test_rows_refit_the_temperature_and_precision_retrains(tmp_path, capsys):
    """The classifiers depend on the training rows and the settings (precision included); the
    temperature depends on the val rows too. Swapping val and test rows reuses every model but fits
    the temperature again on the new val rows; --precision bf16 trains the models again."""
    rows = write_two_class_csv(tmp_path, shape=(40, 40, 3), noise=40)
    args = ["--data", "csv", "--csv", str(tmp_path / "data.csv"), "--out", str(tmp_path / "out"), "--steps", "20",
            "--batch", "16", "--width", "8", "--lr", "3e-3", "--tau1", "0.6", "--tau2", "0.6", "--threads", "1", "--size", "32"]
    fd.main(args)
    capsys.readouterr()
    for r in rows[40:60]:
        r[2] = "test" if r[2] == "val" else "val"
    write_two_class_csv(tmp_path, rows)
    fd.main(args)
    text = capsys.readouterr().out
    assert text.count("finished earlier: reusing") == 7 and "training on" not in text
    assert "fitting the temperature again" in text
    model, ckpt = fd.load_attribute_classifier(str(tmp_path / "out" / "classifiers" / "evaluation.pt"))
    data = fd.read_dataset(fd.parse_args(args))
    val = np.flatnonzero(data["splits"] == 1)
    assert [p.rsplit("/", 1)[-1] for p in data["paths"][val]] == [f"{i}.png" for i in range(50, 60)]
    _, logits = fd._scores(ckpt, len(data["paths"]))
    expected = fd.calibrate(logits[val], data["labels"][val])["temperature"]    # fitted on the new val rows
    assert ckpt["calibration"]["temperature"] == pytest.approx(expected, rel=1e-9)
    assert float(model.temperature) == pytest.approx(expected, rel=1e-9)
    fd.main(args)
    assert "fitting the temperature again" not in capsys.readouterr().out          # same rows: reused as is
    fd.main(args + ["--precision", "bf16", "--overwrite"])                         # other settings: --overwrite
    text = capsys.readouterr().out
    assert text.count("was made with other settings or data: retraining") == 7 and "finished earlier" not in text


# ---------------------------------------------------------------- command line: bad inputs

def small_set(tmp_path, n=70):
    make_celeba(str(tmp_path / "c"), n=n)
    return ["--data", "celeba", "--root", str(tmp_path / "c"), "--out", str(tmp_path / "out"), "--workers", "1"]


@pytest.mark.parametrize("case", ["no_attr_file", "unknown_attr", "unreadable", "wrong_size", "empty_class"])
def test_bad_input_fails_in_one_line_without_an_index(tmp_path, case):
    args, attr = small_set(tmp_path), ["--attr", "Smiling"]
    img = str(tmp_path / "c" / "img_align_celeba" / "000007.jpg")
    expect = {"no_attr_file": "list_attr_celeba.txt not found", "unknown_attr": "unknown attribute 'Smilling'; valid:",
              "unreadable": "000007.jpg is not an image Pillow can read", "wrong_size": "000007.jpg is 100x120, expected",
              "empty_class": "is empty after step 1 (--tau1 0.9)"}[case]
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "index.csv").write_text("path,label\nstale,0\n")   # a previous run's index, in every case
    if case == "no_attr_file":
        os.remove(tmp_path / "c" / "list_attr_celeba.txt")
    elif case == "unknown_attr":
        attr = ["--attr", "Smilling"]
    elif case == "unreadable":
        open(img, "wb").write(b"not a jpeg at all")
    elif case == "wrong_size":
        cv2.imwrite(img, np.zeros((120, 100, 3), np.uint8))
    elif case == "empty_class":       # one step: p(y|x) ~ 0.5 everywhere, nothing passes tau1
        attr += ["--steps", "1", "--width", "4"]
    r = cli(*args, *attr)
    assert r.returncode != 0 and expect in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not os.path.exists(tmp_path / "out" / "index.csv")   # removed before reading: no stale index survives


def test_a_filter_run_with_other_settings_is_not_replaced_without_overwrite(run):
    base = ["--data", "celeba", "--root", str(run["base"] / "celeba"), "--attr", "Smiling", "--out", run["out"], *TINY]
    with pytest.raises(fd.DataError, match=r"holds a filter run made with other settings \(tau1\); pass --overwrite"):
        fd.parse_args(base + ["--tau1", "0.8"])
    assert fd.parse_args(base + ["--tau1", "0.8", "--overwrite"]).tau1 == 0.8
    assert fd.parse_args(base + ["--threads", "1"]).out == run["out"]   # the same settings: resumed, not refused


def test_bad_flags_fail_in_one_line(tmp_path, capsys):
    for argv, message in ((["--data", "celeba", "--root", "r"], "--data celeba needs --attr"),
                          (["--data", "csv", "--csv", "f", "--tau2", "1.5"], "--tau2 must be in (0, 1)"),
                          (["--data", "csv", "--csv", "f", "--per-side", "5"], "expected two positive numbers")):
        with pytest.raises(SystemExit) as e:
            fd.parse_args([*argv, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_subset_presets_are_the_papers(tmp_path):
    """Sec. 5.2 / 5.4: 60k ... 5k split evenly per side; App. D: Young = 7k old (class 0, x2) + 15k young."""
    base = ["--data", "celeba", "--root", "r", "--attr", "Young", "--out", str(tmp_path / "o")]
    young = fd.parse_args([*base, "--subset", "young"])
    assert young.per_side == (7000, 15000) and young.oversample == (2, 1)
    assert 2 * young.per_side[0] + young.per_side[1] == 29000                 # the training set after oversampling
    for name, per_side in (("60k", 30000), ("30k", 15000), ("10k", 5000), ("5k", 2500)):
        cfg = fd.parse_args([*base, "--subset", name])
        assert cfg.per_side == (per_side, per_side) and cfg.oversample == (1, 1), name
        assert 2 * per_side == int(name[:-1]) * 1000
    assert fd.parse_args(base).per_side is None and fd.parse_args([*base, "--paper"]).per_side == (30000, 30000)
    flags = fd.parse_args([*base, "--subset", "young", "--per-side", "10,20", "--oversample", "1,3"])
    assert flags.per_side == (10, 20) and flags.oversample == (1, 3)         # explicit flags win over the preset
    assert not (tmp_path / "o").exists()                                      # parsing writes nothing


def test_help():
    r = cli("--help")
    assert r.returncode == 0 and "--tau2" in r.stdout and "--subset" in r.stdout and "--paper" in r.stdout


def test_what_a_researcher_s_own_files_bring(tmp_path):
    """macOS's ._ files and a folder named like an image are skipped; Excel's BOM and a `filename,label`
    header are read; a 16-bit grey PNG keeps its grey levels (converted to RGB it would be all white)."""
    for name in ("a", "b"):
        os.makedirs(tmp_path / "f" / name / "day1.png")                       # a folder, not an image
        for i in range(3):
            cv2.imwrite(str(tmp_path / "f" / name / f"{i}.png"), np.full((8, 8, 3), 40, np.uint8))
        (tmp_path / "f" / name / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    d = fd.folder_dataset(str(tmp_path / "f"))
    assert len(d["paths"]) == 6 and not any(os.path.basename(p).startswith(".") for p in d["paths"])
    for header in ("path,label", "filename,label"):
        text = header + "\n" + "".join(f"f/{c}/{i}.png,{c}\n" for c in "ab" for i in range(3))
        (tmp_path / "list.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())      # what Excel writes
        c = fd.csv_dataset(str(tmp_path / "list.csv"))
        assert c["class_names"] == ["a", "b"] and len(c["paths"]) == 6, header
    grey16 = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    assert cv2.imwrite(str(tmp_path / "g16.png"), grey16)
    rgb = fd.read_rgb((tmp_path / "g16.png").read_bytes())
    assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 0], np.rint(grey16 / 65535 * 255).astype(np.uint8))


def test_a_finished_filter_is_reused_only_for_the_same_images(tmp_path):
    """train.py reuses OUT/filter when its settings AND its list of images match; one more image reruns it."""
    import real_images
    for name in ("a", "b"):
        os.makedirs(tmp_path / "f" / name)
        for i in range(30):
            cv2.imwrite(str(tmp_path / "f" / name / f"{i}.png"), np.full((8, 8, 3), 40, np.uint8))
    args = fd.parse_args(["--data", "folder", "--root", str(tmp_path / "f"), "--out", str(tmp_path / "filter")])
    os.makedirs(args.out)
    plumbing_json = json.loads(json.dumps(dict(vars(args), device=str(args.device))))
    (tmp_path / "filter" / "config.json").write_text(json.dumps(plumbing_json))
    data = fd.read_dataset(args)
    rows = ["path,label,split,row,kept,repeat,reason"] + [f"{p},{l},train,{i},1,1," for i, (p, l)
                                                          in enumerate(zip(data["paths"], data["labels"]))]
    (tmp_path / "filter" / "index.csv").write_text("\n".join(rows) + "\n")
    assert real_images.filter_finished(args)
    cv2.imwrite(str(tmp_path / "f" / "a" / "new.png"), np.full((8, 8, 3), 40, np.uint8))
    assert not real_images.filter_finished(args)
