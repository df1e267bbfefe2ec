"""plumbing.py -- what every zsi script needs and none of them is about. No science here.

A concept file (ddpm.py, multiguide.py, filter_data.py, ...) imports this module for plumbing and
imports other concept files only for their science. What lives here:

    1. Command lines: `OneLineParser` (a bad flag costs one line, exit 2, never a traceback), the
       shared flag vocabulary `add_flags` (--steps, --sample-steps, --n-samples, --batch, --seed,
       --device, --threads, --out, --overwrite mean the same in every script), old spellings refused
       with the new name, number checks that name the flag (`positive_int`, `finite_float`, ...), and
       `vet` (a ValueError of a science check turned into a one-line error naming the flag).
    2. Where to run: `check_device` ("auto" -> CUDA when present, else the CPU) and `set_threads`.
    3. Files: atomic writes (a temporary file in the same folder, then os.replace: a crash or a
       kill never leaves half a file), a lock per run folder (`RunLock`: one run at a time), JSON,
       and the checks before any work: an output folder (`check_out_folder`), outputs of an earlier
       run (`refuse_overwrite`), a benchmark's --json file (`check_json_path`).
    4. Checkpoints: `save_checkpoint` / `load_checkpoint`. Loading never runs code: torch.load with
       weights_only=True, so a checkpoint may hold only tensors, numbers, strings, lists, tuples and
       dicts. A file that needs more (pickled classes, functions) is refused in one line.
    5. Pictures: `save_grid` (uint8 images tiled into one PNG), `save_figure` (a matplotlib Figure
       to PNG without pyplot), and the [-1, 1] <-> uint8 image conversions.
    6. Progress: a live bar on a terminal, one line every ~10% elsewhere (CI logs, nohup, notebooks).
"""
import argparse
import contextlib
import dataclasses
import errno
import io
import json
import math
import os
import pickle
import shlex
import sys
import tempfile
import time

import cv2
import numpy as np
import torch

CHECKPOINT_FORMAT = 2  # bumped when the layout of a checkpoint dict changes (see load_checkpoint)


# ----------------------------------------------------------------------------------------------
# 1. Command lines
# ----------------------------------------------------------------------------------------------

class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's real default; options without one (required, switches, defaults that
    depend on a preset or are empty, which their help text describes in words) show none, never "None"
    or an empty "(default: )"."""

    def _get_help_string(self, action):
        no_default = (action.default is None or action.default is False or action.default is argparse.SUPPRESS
                      or (isinstance(action.default, str) and action.default == ""))  # not 0, which == False
        if action.required or no_default or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse for every zsi command line: a bad flag costs one line (the error), not the usage block.

    renamed: {old flag: new flag}. An old spelling is refused with one line naming its new name,
    e.g. `--n` -> "--n was renamed --n-samples". Subparsers inherit the class (and their own renames).
    """

    def __init__(self, *args, renamed=None, **kwargs):
        kwargs["formatter_class"] = DefaultsFormatter
        super().__init__(*args, **kwargs)
        self.renamed = dict(renamed or {})

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        for a in argv:
            old = a.split("=", 1)[0]
            if old in self.renamed:
                self.error(f"{old} was renamed {self.renamed[old]}; use {self.renamed[old]}")
        return super().parse_known_args(argv, namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def number(kind, test, wanted):
    """An argparse type: kind(text), refused unless finite and test(value); the message says what is wanted."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or not test(value):
            raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}")
        return value
    parse.__name__ = wanted  # argparse names the type in some messages
    return parse


positive_int = number(int, lambda v: v > 0, "an integer >= 1")
nonnegative_int = number(int, lambda v: v >= 0, "an integer >= 0")
finite_float = number(float, lambda v: True, "a finite number")
positive_float = number(float, lambda v: v > 0, "a finite number > 0")
nonnegative_float = number(float, lambda v: v >= 0, "a finite number >= 0")
probability = number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def vet(parser, flag, check, *args):
    """check(*args), its ValueError (or argparse type error) turned into the parser's one-line error naming flag."""
    try:
        return check(*args)
    except (ValueError, argparse.ArgumentTypeError) as e:
        parser.error(f"{flag}: {e}")


def float_list(text):
    """'30,30' -> [30.0, 30.0]; every element finite ('' -> [])."""
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    try:
        values = [float(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


# The shared vocabulary: one meaning per flag in every zsi command line. add_flags(parser, "seed",
# "out", n_samples=256) adds those flags with the given defaults (a flag without a default there is
# required for "out", else takes the vocabulary's default).
VOCABULARY = {
    "steps": dict(type=positive_int, help="training steps"),
    "sample_steps": dict(type=str, default="50", help="respaced sampling steps: N (evenly spaced), n1,n2,... "
                                                      "(per section) or ddimN"),
    "n_samples": dict(type=positive_int, default=256, help="number of samples"),
    "batch": dict(type=positive_int, default=128, help="images per network call"),
    "seed": dict(type=nonnegative_int, default=0, help="fixes every random draw (data, noise, initialisation)"),
    "device": dict(type=str, default="auto", help="auto (CUDA when present, else the CPU) | cpu | cuda | cuda:N"),
    "threads": dict(type=nonnegative_int, default=0, help="CPU threads (0: all cores, at most 8)"),
    "out": dict(type=str, help="output folder (created)"),
    "overwrite": dict(action="store_true", help="replace the outputs of an earlier run in --out"),
}


def add_flags(parser, *names, **defaults):
    """Add vocabulary flags to `parser`: names take the vocabulary's defaults, keywords set their own."""
    for name in (*names, *defaults):
        spec = dict(VOCABULARY[name])
        if name in defaults:
            spec["default"] = defaults[name]
        if name == "out" and "default" not in spec:
            spec["required"] = True
        parser.add_argument("--" + name.replace("_", "-"), **spec)
    return parser


def add_dataclass_flags(parser, cls, presets=None, groups=None):
    """One flag per field of the dataclass `cls` (--field-name), typed by its default, defaulting to None so
    that a preset can fill what the command line leaves out. Each help shows the real default and the value
    of every preset that changes it: presets {label: {field: value}}; groups {name: [labels]} writes a
    name for a set of labels that all agree (e.g. "--paper" for every paper preset)."""
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata, help=preset_help(f, presets or {}, groups or {}))
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
        else:
            kind = {int: int, float: finite_float}.get(type(f.default), str)
            parser.add_argument(flag, type=kind, default=None, **meta)


def preset_help(f, presets, groups):
    """A dataclass field's help: its text, its default, and the presets that change it (grouped by value)."""
    by_value = {}
    for label, table in presets.items():
        if f.name in table:
            by_value.setdefault(repr(table[f.name]), []).append(label)
    for value, labels in by_value.items():
        for name, members in groups.items():
            if all(m in labels for m in members):
                by_value[value] = [lb for lb in labels if lb not in members] + [name]
    default = "off" if f.default is False else ("''" if f.default == "" else f.default)
    listed = "; ".join(f"{'|'.join(labels)}: {value.strip(chr(39))}" for value, labels in by_value.items())
    if "default" in f.metadata["help"]:  # the help says the default in words
        return f.metadata["help"] + (f" (presets: {listed})" if listed else "")
    return f.metadata["help"] + f" (default: {default}" + (f"; {listed})" if listed else ")")


# ----------------------------------------------------------------------------------------------
# 2. Where to run
# ----------------------------------------------------------------------------------------------

def default_threads(processes=1):
    """All cores, at most 8, shared among `processes` processes of this machine (never oversubscribed:
    spinning OpenMP threads that outnumber the cores slow every process down many times over)."""
    return max(1, min(8, (os.cpu_count() or 1) // max(1, processes)))


def set_threads(threads=0, processes=1):
    """torch's CPU threads: `threads`, or default_threads(processes) for 0. Returns the number set."""
    n = threads or default_threads(processes)
    torch.set_num_threads(n)
    return n


def check_device(name):
    """The device a --device value names, refused in one line (SystemExit) when it cannot run here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise SystemExit(f"error: --device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} asked for, but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SystemExit(f"error: --device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise SystemExit(f"error: --device {name}: zsi runs on cpu or cuda")
    return device


def autocast(precision, device):
    """The autocast context of a precision: fp32 none; bf16 on the CPU or CUDA; fp16 (float16) on either."""
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"unknown precision {precision!r}; expected fp32, bf16 or fp16")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    device = torch.device(device)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


# ----------------------------------------------------------------------------------------------
# 3. Files
# ----------------------------------------------------------------------------------------------

def _umask():
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes_atomically(path, data):
    """Write bytes to path through a uniquely named temporary file in the same folder, then os.replace:
    readers see the old file or the new one, never half of one, and two writers never share a temp."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix="_" + os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_json(obj, path):
    """obj as indented JSON, written atomically (the results files every script writes)."""
    write_bytes_atomically(path, (json.dumps(obj, indent=2) + "\n").encode())


def read_json(path, what="file", obj=False):
    """A JSON file, or a one-line SystemExit naming it when it is missing or not JSON (or, with obj=True,
    when it holds something other than a JSON object, the {key: value} record every zsi run writes)."""
    try:
        with open(path) as fh:
            value = json.load(fh)
    except FileNotFoundError:
        raise SystemExit(f"error: {what} {path} does not exist") from None
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {what} {path} is not readable JSON ({type(e).__name__})") from None
    if obj and not isinstance(value, dict):
        raise SystemExit(f"error: {what} {path} holds a JSON {type(value).__name__}, not the object a zsi run writes")
    return value


def write_npz(path, **arrays):
    """np.savez_compressed, written atomically."""
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    write_bytes_atomically(path, buf.getvalue())


def check_out_folder(path, flag="--out"):
    """Refuse, in one line, an output folder that cannot be one: a file, or below a file, or unwritable."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if os.path.exists(probe) and not os.path.isdir(probe):
        raise SystemExit(f"error: {flag} {path}: {probe} is a file; expected a folder")
    if os.path.isdir(probe) and not os.access(probe, os.W_OK | os.X_OK):
        raise SystemExit(f"error: {flag} {path}: {probe} is not writable")


def check_json_path(parser, path, overwrite, flag="--json"):
    """Before a benchmark times anything: refuse, with parser.error (one line, exit 2), a --json PATH that
    cannot be written as a file (a folder, a path below a file or in an unwritable folder), or an
    existing file without --overwrite. The file is then written with write_json (atomically)."""
    if not path:
        return
    if os.path.isdir(path):
        parser.error(f"{flag} {path} is a folder; expected a file name, e.g. {os.path.join(path, 'results.json')}")
    probe = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(probe):                  # the deepest folder that exists: the one we would create in
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        parser.error(f"{flag} {path}: {probe} is a file; expected a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        parser.error(f"{flag} {path}: {probe} is not writable")
    if os.path.exists(path) and not overwrite:
        parser.error(f"{flag} {path} already exists; pass --overwrite to replace it, or choose another {flag}")


def refuse_overwrite(folder, names, overwrite, flag="--out"):
    """Before any work: refuse, in one line, to replace outputs `names` of an earlier run in `folder`
    unless --overwrite was given."""
    found = [n for n in names if os.path.exists(os.path.join(folder, n))]
    if found and not overwrite:
        raise SystemExit(f"error: {flag} {folder} already holds {', '.join(found)} from an earlier run; pass "
                         f"--overwrite to replace them, or choose another {flag}")


class RunLock:
    """One run per folder: an exclusive lock on FOLDER/.lock, held while the run lives.

    The lock is an fcntl.flock on an open file: the kernel releases it when the process ends, however
    it ends (kill -9 included), so a stale lock file never blocks the next run. A second run on the
    same folder is refused in one line, or waits for the first when wait=True. A run that fails
    (any exception, a refusal included) leaves no trace: the lock file goes, and so does the folder
    when this lock created it and nothing else was written there.
    """

    def __init__(self, folder, wait=False):
        self.folder, self.wait, self.fh = folder, wait, None
        self.path = os.path.join(folder, ".lock")

    def __enter__(self):
        import fcntl
        self.created_folder = not os.path.isdir(self.folder)
        self.created_file = not os.path.exists(self.path)
        os.makedirs(self.folder, exist_ok=True)
        self.fh = open(self.path, "a+")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except OSError as e:
            self.fh.close()
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise SystemExit(f"error: another run is using {self.folder}; wait for it to finish (or pass "
                             f"--wait), or choose another --out") from None
        self.fh.truncate(0)
        self.fh.write(f"{os.getpid()}\n")
        self.fh.flush()
        return self

    def __exit__(self, kind, value, tb):
        failed = kind is not None and not (kind is SystemExit and value.code in (0, None))
        if failed and self.created_file and os.path.exists(self.path):
            os.remove(self.path)
        self.fh.close()  # closing the file releases the flock
        if failed and self.created_folder and not os.listdir(self.folder):
            os.rmdir(self.folder)
        return False


# ----------------------------------------------------------------------------------------------
# 4. Checkpoints
# ----------------------------------------------------------------------------------------------

class CheckpointError(SystemExit):
    """A checkpoint that is missing, unreadable, unsafe or of the wrong kind: exits with its one-line message."""


def save_checkpoint(path, obj):
    """torch.save of a plain dict (tensors, numbers, strings, lists, dicts), written atomically."""
    buf = io.BytesIO()
    torch.save(dict(obj, format=CHECKPOINT_FORMAT), buf)
    write_bytes_atomically(path, buf.getvalue())


def load_checkpoint(path, kind=None):
    """Load a zsi checkpoint (a dict with at least "kind") without running any code from it.

    Every zsi checkpoint holds: kind ("ddpm", "classifier", ...), model_config (rebuilds the network
    with its class's constructor), the weights ("model", and "ema" when trained with EMA), and for
    training checkpoints the optimizer, scaler, step, log and the run's configuration as a dict.
    Refused with one line (CheckpointError): a missing or truncated file, a file whose unpickling
    would run code (weights_only=True rejects it), a file that is not a zsi checkpoint, the wrong kind.
    """
    if os.path.isdir(path):
        raise CheckpointError(f"error: checkpoint {path} is a folder; expected a checkpoint file (.pt)")
    if not os.path.isfile(path):
        raise CheckpointError(f"error: checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = str(e).split("GLOBAL ")[-1].split(" ")[0] if "GLOBAL " in str(e) else "a Python object"
        raise CheckpointError(f"error: checkpoint {path} refused: loading it would run code ({culprit}); zsi "
                              "checkpoints hold only tensors, numbers, strings, lists and dicts") from None
    except Exception as e:  # truncated, or not a torch file at all
        raise CheckpointError(f"error: checkpoint {path} is unreadable ({type(e).__name__}); it may be "
                              "truncated or not a checkpoint") from None
    if not isinstance(ckpt, dict) or "kind" not in ckpt:
        raise CheckpointError(f"error: checkpoint {path} is not a zsi checkpoint (no 'kind' entry)")
    if ckpt.get("format", 1) > CHECKPOINT_FORMAT:
        raise CheckpointError(f"error: checkpoint {path} has format {ckpt['format']}, newer than this code's "
                              f"{CHECKPOINT_FORMAT}; update zsi")
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"error: checkpoint {path} holds a {ckpt['kind']!r} model, expected a {kind!r}")
    return ckpt


def rebuild(path, ckpt, build, weights="model"):
    """build(**ckpt["model_config"]) with the checkpoint's weights loaded; a layout this code does not
    know (an older or foreign checkpoint) is refused in one line that says what to do."""
    try:
        model = build(**ckpt["model_config"])
        model.load_state_dict(ckpt[weights])
    except (KeyError, TypeError, RuntimeError, ValueError) as e:
        reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise CheckpointError(f"error: checkpoint {path} does not rebuild its {ckpt.get('kind')} model ({reason}); "
                              "it was written by another version of zsi: retrain it with this one") from None
    return model


# ----------------------------------------------------------------------------------------------
# 5. Pictures
# ----------------------------------------------------------------------------------------------

def to_tensor(images):
    """uint8 (N, S, S, 3) in [0, 255] -> float32 tensor (N, 3, S, S) in [-1, 1] (v / 127.5 - 1)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)  # (N, 3, S, S)
    return x.to(torch.float32) / 127.5 - 1.0


def to_uint8(x):
    """float tensor (N, 3, S, S) in [-1, 1] -> uint8 array (N, S, S, 3): clamp, rescale, round."""
    x = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()  # (N, S, S, 3)


def save_figure(fig, path):
    """Render a matplotlib Figure (no pyplot, no global backend) to PNG, written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # only the scripts that plot pay for matplotlib
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes_atomically(path, buf.getvalue())


def new_figure(width=6.0, height=4.0):
    """A matplotlib Figure that belongs to no pyplot state (safe in threads and tests)."""
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height))


def save_grid(images, path, nrow=None, scale=1, marks=None, frames=None):
    """Tile N uint8 images (N, H, W, 3) or (N, H, W) into one PNG, nrow images per row.

    nrow defaults to ceil(sqrt(N)). Each tile is upscaled by `scale` (nearest neighbour), tiles are
    separated by 1-pixel grey (128) lines, and empty cells are grey. The PNG is
    (rows * H * scale + rows - 1) x (nrow * W * scale + nrow - 1) pixels, rows = ceil(N / nrow).
    marks: optional x positions in [0, 1] of each tile (e.g. a held-out band's ends), drawn as thin
    red vertical lines on every tile.
    frames: optional bools, one per image: those tiles get a 1-pixel red border (e.g. the samples whose
    measured attribute lies in a held-out band).
    """
    images = np.asarray(images)
    if images.ndim == 3:
        images = np.repeat(images[..., None], 3, axis=3)           # grey -> RGB
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3 or len(images) == 0:
        raise ValueError(f"save_grid expects uint8 (N, H, W, 3) with N >= 1, got {images.dtype} {images.shape}")
    n, h, w, _ = images.shape
    nrow = int(nrow or math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    th, tw = h * scale, w * scale                                  # tile size after upscaling
    grid = np.full((rows * th + rows - 1, nrow * tw + nrow - 1, 3), 128, dtype=np.uint8)
    tiles = images.repeat(scale, axis=1).repeat(scale, axis=2)     # (N, th, tw, 3)
    if marks:
        tiles = tiles.copy()
        for z in marks:
            tiles[:, :, min(tw - 1, int(round(z * tw))), :] = (255, 0, 0)
    if frames is not None:
        tiles = tiles.copy()
        framed = tiles[np.asarray(frames, dtype=bool)]
        framed[:, [0, -1], :, :], framed[:, :, [0, -1], :] = (255, 0, 0), (255, 0, 0)
        tiles[np.asarray(frames, dtype=bool)] = framed
    for i, tile in enumerate(tiles):
        r, c = divmod(i, nrow)
        grid[r * (th + 1): r * (th + 1) + th, c * (tw + 1): c * (tw + 1) + tw] = tile
    ok, png = cv2.imencode(".png", cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))  # cv2 wants BGR
    if not ok:
        raise RuntimeError(f"cv2 could not encode the grid for {path}")
    write_bytes_atomically(path, png.tobytes())


# ----------------------------------------------------------------------------------------------
# 6. Progress and interrupts
# ----------------------------------------------------------------------------------------------

class Progress:
    """Progress of `total` steps: a live tqdm bar when stderr is a terminal; elsewhere (CI, nohup, a
    notebook) one line on stdout every ~10% with the rate and the time left, never carriage returns in
    a log file. update(n, **postfix) after each step."""

    def __init__(self, total, desc, initial=0, unit="step", enabled=True):
        self.total, self.desc, self.done, self.unit = total, desc, initial, unit
        self.enabled = enabled and total > initial
        self.t0, self.start, self.next_line = time.time(), initial, initial
        self.bar, self.stream = None, sys.stdout
        if self.enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                            mininterval=1.0, file=sys.stderr)
        self._advance_line_mark()

    def _advance_line_mark(self):
        step = max(1, math.ceil(self.total / 10))
        self.next_line = (self.done // step + 1) * step

    def update(self, n=1, **postfix):
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.done >= self.next_line or self.done >= self.total:
            elapsed = time.time() - self.t0
            rate = (self.done - self.start) / max(elapsed, 1e-9)
            left = (self.total - self.done) / max(rate, 1e-9)
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            print(f"[{self.desc}] {self.done}/{self.total} {self.unit}s, {rate:.2f} {self.unit}/s, "
                  f"{left:.0f} s left{extra}", file=self.stream, flush=True)
            self._advance_line_mark()

    def close(self):
        if self.bar is not None:
            self.bar.close()


def progress(iterable, desc, total=None, enabled=True, unit="step"):
    """Iterate with a Progress display (a bar on a terminal, a line per ~10% elsewhere)."""
    items = list(iterable) if total is None else iterable
    bar = Progress(len(items) if total is None else total, desc, unit=unit, enabled=enabled)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def forward_flops(model, image_size, channels=3):
    """Floating-point operations (2 per multiply-add) of one forward pass on one image at t = 0, counted
    by torch's FlopCounterMode (convolutions and matrix products; the element-wise rest is small)."""
    from torch.utils.flop_counter import FlopCounterMode
    device = next(model.parameters()).device
    x, t = torch.zeros(1, channels, image_size, image_size, device=device), torch.zeros(1, dtype=torch.long, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t)
    return int(counter.get_total_flops())


_OPEN_STAGES = []  # the timed() blocks now running, innermost last: (timings, name)


@contextlib.contextmanager
def timed(timings, name):
    """Add the wall time of the block to timings[name] (seconds), plus what the block credits (below)."""
    t0 = time.time()
    _OPEN_STAGES.append((timings, name))
    try:
        yield
    finally:
        _OPEN_STAGES.pop()
        timings[name] = timings.get(name, 0.0) + time.time() - t0


def credit(seconds):
    """Count `seconds` that an earlier process spent on work this one reuses (a resumed checkpoint carries
    its training time, a samples file the time it took to draw) in every open timed() stage, and in
    timings["credited_s"]: a resumed run then reports what its outputs cost, not what this process did."""
    for timings in {id(t): t for t, _ in _OPEN_STAGES}.values():
        timings["credited_s"] = timings.get("credited_s", 0.0) + seconds
    for timings, name in _OPEN_STAGES:
        timings[name] = timings.get(name, 0.0) + seconds


def step_seconds(fn):
    """Wall seconds of one call of fn, timed after one warm-up call: the cost model of a run's estimate."""
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint (fit.py); exit_code is 130 or 143."""

    def __init__(self, step, signum, ckpt_path):
        super().__init__(f"interrupted at step {step}; checkpoint {ckpt_path}")
        self.step, self.ckpt_path = step, ckpt_path
        self.exit_code = 128 + signum


def guard(main, resume_flag=None):
    """Run a command line's main(): Ctrl-C or SIGTERM ends it with one line saying how to continue and exit
    status 130 / 143, never a traceback. resume_flag: the flag that continues a run ("--resume"), or None
    when running the same command again resumes."""
    argv = [os.path.basename(sys.argv[0]), *sys.argv[1:]]
    if resume_flag:  # continuing replaces nothing: --overwrite would contradict --resume
        argv = [a for a in argv if a != "--overwrite"] + ([resume_flag] if resume_flag not in argv else [])
    again = "python " + shlex.join(argv)                        # quoted: paths with spaces paste back
    try:
        return main()
    except Interrupted as e:
        print(f"\ninterrupted at step {e.step}; checkpoint {e.ckpt_path} saved. Continue with: {again}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    except KeyboardInterrupt:
        print(f"\ninterrupted. Continue with: {again}", file=sys.stderr)
        raise SystemExit(130) from None
