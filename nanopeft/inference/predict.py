"""Classify images that have no labels: inputs ─► batches ─► top-k rows of a CSV, streamed, resumable, sharded.

    list_inputs(DIR | CSV | GLOB) ─► Inputs(paths, extra columns)          (every image, input order)
    ImageFiles(paths) ─► (pixel_values, index, error)   an unreadable image yields error != "" and zeros
    predict_to_csv(model, inputs, out, ...)             one row per image: path, label, prob, label_2, ...

    read_run / run_classifier(run)                      a train.py run folder -> its merged classifier

Memory stays flat: batches are written (and flushed) as they come; what is held is one row location
per image (nanopeft/inference/csvout.py) and, for `--prior-correction em`, the (N, C) posteriors. Resume: the rows already in the output are
skipped (a killed run loses at most the batch it was writing; a torn last line is cut off).

Several processes (torchrun): the j-th image still to do goes to rank j mod N (no padding, no repeats); each rank streams
`OUT.part-<rank>.csv` with an `index` column, and rank 0 merges them in input order into OUT once all
are done. `em` needs every posterior before any label is final: its rows go to `OUT.posteriors.csv`
(index, path, one probability per class, error; kept: the full posteriors are useful), then the corrected
labels to OUT and the estimated priors to `<OUT stem>.priors.json`.
"""

from __future__ import annotations

import copy
import csv
import glob
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from ..data.augment import resize_normalize
from ..data.folders import IMAGE_EXTENSIONS, load_image
from ..files.checkpoint_format import CheckpointError, read_json
from .csvout import Sink, csv_line, line_at, locate_rows, merge_rows, parse_line, work_files
from ..prior import correct


# ----------------------------------------------------------------------------- run folders
def run_weights_file(run) -> Path:
    """What a run trained: RUN/probe.safetensors for a probe (probes.py), else RUN/adapter/adapter_model.safetensors."""
    from ..probes import PROBE_FILE

    probe = Path(run) / PROBE_FILE
    return probe if probe.is_file() else Path(run) / "adapter" / "adapter_model.safetensors"


def read_run(run) -> tuple:
    """(TrainConfig, the run's config.json dict) of a folder train.py wrote; clear errors otherwise."""
    from ..config import TrainConfig

    cfg_file = Path(run) / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"--run {run}: no config.json there (expected a folder written by train.py)")
    weights = run_weights_file(run)
    if not weights.is_file():
        raise FileNotFoundError(f"--run {run}: no adapter/adapter_model.safetensors or {weights.name} (did the run "
                                f"finish an epoch?)")
    saved = read_json(cfg_file)
    if not isinstance(saved.get("train"), dict) or not isinstance(saved.get("class_names"), list):
        raise CheckpointError(f"{cfg_file}: no `train` settings or `class_names`: not a config.json train.py wrote")
    try:
        return TrainConfig(**saved["train"]), saved
    except TypeError as e:  # a field this version does not know
        raise CheckpointError(f"{cfg_file}: {e}") from None


def run_classifier(run, device, dtype=None, weights=None, merge: str = "yes", wise: float = 1.0,
                   backbones: dict | None = None):
    """Rebuild a run's classifier, load what it trained and (merge="yes"|"requantize") fold the adapters
    into the base -> (model in eval mode, config.json dict). `weights` replaces the recorded backbone path.
    wise: WiSE-FT's α (nanopeft/methods/wise.py; 1 = the run as trained). backbones: a cache shared by the
    members of an ensemble, {(weights, quant, dtype, device): the loaded pretrained backbone}; each member
    gets a copy, so the checkpoint is read once."""
    from ..config import SCRATCH_METHODS, TUNED_METHODS
    from ..methods.inject import merge_adapters
    from ..methods.wise import check_alpha, wise_
    from ..training.build import build_classifier
    from ..training.run_folder import load_run_weights

    cfg, saved = read_run(run)
    if weights:
        cfg.weights = weights
    if cfg.method not in SCRATCH_METHODS and not Path(cfg.weights).exists():
        raise FileNotFoundError(f"the run's backbone {cfg.weights} does not exist here; pass --weights PATH")
    if check_alpha(wise) != 1.0 and cfg.method not in TUNED_METHODS:
        raise ValueError(f"--wise {wise:g}: {run} is a {cfg.method} run, whose backbone was never fine-tuned; "
                         f"WiSE interpolates a fine-tuned backbone with the pretrained one")
    dtype = dtype or torch.float32
    key = (str(cfg.weights), cfg.quant, dtype, str(device))
    if backbones is not None and cfg.method not in SCRATCH_METHODS and key in backbones:
        model = build_classifier(cfg, saved["num_classes"], device, dtype=dtype, adapters=False, meta=True)
        model.backbone = copy.deepcopy(backbones[key])  # the pretrained backbone, read once per ensemble
        model.head.to_empty(device=device)
    else:
        model = build_classifier(cfg, saved["num_classes"], device, dtype=dtype, adapters=False)
        if backbones is not None and cfg.method not in SCRATCH_METHODS:
            backbones[key] = copy.deepcopy(model.backbone)
    pretrained = ({k: v.detach().clone() for k, v in model.backbone.named_parameters()}
                  if wise != 1.0 and cfg.method in ("bitfit", "layernorm", "full") else None)
    load_run_weights(model, cfg, Path(run) / "adapter")
    wise_(getattr(model, "backbone", model), wise, pretrained)
    if merge != "no" and cfg.method in ("lora", "dora", "ssf"):  # the methods linear in the weights
        merge_adapters(model.backbone, requantize=(merge == "requantize"))
    return model.eval(), saved


def run_train_priors(cfg, saved: dict) -> np.ndarray:
    """The class priors the run's classifier learnt: uniform when it trained with a balanced sampler or
    balanced class weights, else the recorded `train_class_counts`, else the class shares of its data
    (the stratified split keeps them), else uniform (the study's 240 images per class)."""
    names = saved["class_names"]
    uniform = np.full(len(names), 1.0 / len(names))
    if getattr(cfg, "sampler", "uniform") == "balanced" or getattr(cfg, "class_weights", "none") == "balanced":
        return uniform
    counts = saved.get("train_class_counts")
    if isinstance(counts, dict) and all(c in counts for c in names):
        c = np.array([float(counts[n]) for n in names])
        return c / c.sum() if c.sum() > 0 else uniform
    try:
        from ..data.folders import scan_dataset, split_folders

        splits = split_folders(cfg.data)
        items, _ = scan_dataset(splits["train"] if splits else cfg.data, class_names=names)
        c = np.bincount([s.label for s in items], minlength=len(names)).astype(float)
        return c / c.sum()
    except (OSError, ValueError):
        return uniform


def run_identity(run) -> str:
    """Which model a run folder predicts with: its adapter's content id (save.adapter_identity)."""
    from ..files.save import file_identity

    return file_identity(run_weights_file(run))[0]


def adapter_provenance(run) -> dict:
    """Which adapter of a run eval.py / predict.py score: {adapter_id, adapter_epoch, epochs_done, finished,
    note}. The note says which epoch's adapter it is when that is not simply the finished run's last one."""
    from ..files.save import file_identity

    run = Path(run)
    ident, epoch = file_identity(run_weights_file(run))
    done = 0
    try:
        for line in (run / "metrics.jsonl").read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line of a run killed mid-write
            if isinstance(row, dict) and "val_accuracy" in row and isinstance(row.get("epoch"), int):
                done = max(done, row["epoch"])
    except OSError:
        pass
    finished = (run / "summary.json").is_file()
    which = f"epoch {epoch}'s adapter" if epoch is not None else "an adapter of unrecorded epoch"
    note = None
    if not finished:
        note = f"{run} is still training (no summary.json): scoring {which}, the best of {done} epoch(s) so far"
    elif epoch is not None and epoch < done:
        note = f"scoring {which}, the best one kept; the run trained {done} epochs"
    return {"adapter_id": ident, "adapter_epoch": epoch, "epochs_done": done, "finished": finished, "note": note}


def run_calibration(runs, kind: str):
    """The calibration of a run (or of an ensemble's averaged logits) fitted on the validation logits the
    runs stored -> (Calibrator, the line that says which, the mean calibrated validation posterior: the
    source priors of label-shift EM). calibration.py has the maps; this finds the runs' logits."""
    from ..calibration import calibrate, runs_val_logits

    runs = [runs] if isinstance(runs, (str, os.PathLike)) else list(runs)
    z, y = runs_val_logits(runs, [run_identity(r) for r in runs])
    cal, why = calibrate(kind, z, y)
    return cal, why, cal.apply(z).softmax(-1).mean(0).numpy()


def export_identity(directory) -> str:
    """Which model an export folder predicts with: the adapter it was made from, its dtype, format and
    calibration."""
    block = read_json(Path(directory) / "config.json").get("nanopeft") or {}
    base = block.get("adapter_id") or "unrecorded"
    cal = block.get("calibration") or {"kind": "none"}
    cal_id = "" if cal.get("kind", "none") == "none" else "/" + cal["kind"] + "-" + \
        hashlib.blake2b(json.dumps(cal, sort_keys=True).encode(), digest_size=4).hexdigest()
    return f"{base}/{block.get('dtype', 'float32')}" + ("/nf4" if block.get("quantize") else "") + cal_id


# ----------------------------------------------------------------------------- the log beside the CSV
def log_path(out) -> Path:
    """OUT.log: one line per predict.py invocation (which model, which precision, what it did)."""
    return Path(f"{out}.log")


def _log_fields(line: str) -> dict[str, str]:
    return dict(f.split("=", 1) for f in line.split() if "=" in f)


def check_resume(out, identity: str, precision: str, calibration: str = "none") -> str | None:
    """Refuse to resume OUT when its log says another model (or precision) wrote it: the rows would mix
    two models' answers. Returns a note for a CSV without a log (written before logs existed), else None."""
    out = Path(out)
    if not out.exists():
        return None
    log = log_path(out)
    starts = [_log_fields(ln) for ln in (log.read_text(errors="replace").splitlines() if log.is_file() else [])
              if " start " in f" {ln} "]
    if not starts:
        return f"{out}: no {log.name} says which model wrote it; resuming it as this model's"
    last = starts[-1]
    for key, now in (("identity", identity), ("precision", precision), ("calibration", calibration)):
        if last.get(key, "none" if key == "calibration" else None) != now:
            raise ValueError(f"{out} was written by another model ({key} {last.get(key)} in {log.name}, this "
                             f"one is {now}): pass --overwrite to replace it, or choose another --out")
    return None


def write_log(out, words: str) -> None:
    """Append one timestamped line to OUT.log."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    with open(log_path(out), "a", encoding="utf-8") as f:
        f.write(f"{stamp} {words}\n")


def remove_outputs(out) -> list[Path]:
    """--overwrite: OUT and everything predict.py keeps beside it (work files, posteriors, priors, log)."""
    out = Path(out)
    files = [out, log_path(out), out.with_name(f"{out.name}.posteriors.csv"), out.with_name(out.stem + ".priors.json"),
             *work_files(out, "part"), *work_files(out, "posteriors")]
    gone = [f for f in dict.fromkeys(files) if f.is_file()]
    for f in gone:
        f.unlink()
    return gone


def count_errors(out) -> int:
    """Rows of OUT whose `error` cell is set (images that did not decode), this run's and earlier ones'."""
    with open(out, newline="", encoding="utf-8") as f:
        return sum(1 for row in csv.DictReader(f) if row.get("error"))


# ----------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    paths: list[str]                         # what the output's `path` column says, input order
    files: list[str]                         # where to read each image (a CSV's relative paths resolved)
    columns: list[str] = field(default_factory=list)   # a CSV's other columns, kept in the output
    extra: list[dict] = field(default_factory=list)    # their values, one dict per image


def _image_files(root: Path) -> list[Path]:
    """Every visible image below root (flat or nested), sorted by path components."""
    files = [f for f in root.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()
             and not any(p.startswith(".") for p in f.relative_to(root).parts)]
    return sorted(files, key=lambda f: f.relative_to(root).parts)


def _read_manifest(path: Path) -> Inputs:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [(c or "").strip() for c in (reader.fieldnames or [])]
        if "path" not in header:
            raise ValueError(f"{path}: no `path` column (got {header}); predict.py needs a header row with path")
        reader.fieldnames = header
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path}: no rows after the header")
    others = [c for c in header if c != "path" and c]
    out = Inputs([], [], others, [])
    for i, row in enumerate(rows, start=2):
        p = (row.get("path") or "").strip()
        if not p:
            raise ValueError(f"{path}:{i}: empty path")
        full = Path(p).expanduser()
        out.paths.append(p)
        out.files.append(str(full if full.is_absolute() else path.parent / full))
        out.extra.append({c: row.get(c) or "" for c in others})
    return out


def list_inputs(data) -> Inputs:
    """DIR (every image under it), a CSV with a `path` column, or a glob pattern (`**` recurses)."""
    p = Path(str(data)).expanduser()
    if p.is_dir():
        files = [str(f) for f in _image_files(p)]
        if not files:
            raise ValueError(f"{p}: no images under it (looked for {', '.join(IMAGE_EXTENSIONS)})")
        return Inputs(files, files)
    if p.is_file() and p.suffix.lower() == ".csv":
        return _read_manifest(p)
    if p.is_file():
        return Inputs([str(p)], [str(p)])
    if glob.has_magic(str(data)):
        files = sorted(f for f in glob.glob(str(p), recursive=True) if Path(f).is_file()
                       and Path(f).suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"--data {data}: the pattern matches no image")
        return Inputs(files, files)
    raise FileNotFoundError(f"--data {data}: no such folder, CSV or file, and not a glob pattern")


class ImageFiles(torch.utils.data.Dataset):
    """(pixel_values (3, S, S), index, error): exactly eval's preprocessing; an image that does not
    decode gives zeros and its error message instead of stopping the run."""

    def __init__(self, files: list[str], indices: list[int], image_size: int):
        self.files, self.indices, self.image_size = files, indices, image_size

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        i = self.indices[j]
        try:
            x = resize_normalize(load_image(self.files[i]).float() / 255, self.image_size)
            return x, i, ""
        except Exception as e:  # noqa: BLE001 - any decoder failure becomes the row's `error`
            cause = e.__cause__ or e
            return torch.zeros(3, self.image_size, self.image_size), i, f"{type(cause).__name__}: {cause}"


# ----------------------------------------------------------------------------- output rows
def topk_header(k: int) -> list[str]:
    cols = ["label", "prob"]
    for j in range(2, k + 1):
        cols += [f"label_{j}", f"prob_{j}"]
    return cols


def output_header(inputs: Inputs, k: int) -> list[str]:
    """path, label, prob, label_2, prob_2, ..., the CSV's other columns, error. An input column whose
    name we write ourselves is kept as `input_<name>`."""
    ours = ["path", *topk_header(k), "error"]
    return ["path", *topk_header(k), *[_renamed(c, ours) for c in inputs.columns], "error"]


def _renamed(col: str, ours: list[str]) -> str:
    return f"input_{col}" if col in ours else col


def topk_cells(probs: np.ndarray, names: list[str], k: int) -> list[str]:
    """One image's (C,) posteriors -> [label, prob, label_2, prob_2, ...] (ties: lower class index)."""
    order = np.argsort(-probs, kind="stable")[:k]
    cells = []
    for c in order:
        cells += [names[c], f"{probs[c]:.6f}"]
    return cells


def _row(inputs: Inputs, i: int, probs, error: str, names, k) -> list[str]:
    cells = topk_cells(probs, names, k) if not error else [""] * (2 * k)
    return [inputs.paths[i], *cells, *[inputs.extra[i][c] for c in inputs.columns], error]


def multilabel_header(inputs: Inputs, names: list[str]) -> list[str]:
    """--task multilabel: path, labels (those over their thresholds, ';'-joined), each class's probability."""
    ours = ["path", "labels", *[f"prob_{c}" for c in names], "error"]
    return [*ours[:-1], *[_renamed(c, ours) for c in inputs.columns], "error"]


def _multilabel_row(inputs: Inputs, i: int, probs, error: str, names, thresholds) -> list[str]:
    labels = ";".join(n for n, p, t in zip(names, probs, thresholds) if p >= t) if not error else ""
    cells = [f"{p:.6f}" for p in probs] if not error else [""] * len(names)
    return [inputs.paths[i], labels, *cells, *[inputs.extra[i][c] for c in inputs.columns], error]


# ----------------------------------------------------------------------------- the loop
def _collate(batch):
    xs, idx, errs = zip(*batch)
    return torch.stack(xs), list(idx), list(errs)


@torch.no_grad()
def posteriors_batches(model, inputs: Inputs, indices: list[int], image_size: int, batch_size: int,
                       workers: int, device, amp=None, show: bool = True, multilabel: bool = False):
    """Yield (indices, (B, C) float64 posteriors, errors) batch by batch, in the order of `indices`.
    Rows of unreadable images hold zeros; the model only sees the readable ones."""
    from ..device import autocast

    ds = ImageFiles(inputs.files, indices, image_size)
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                                         pin_memory=torch.device(device).type == "cuda")
    with tqdm(total=len(indices), unit="img", desc="predict", dynamic_ncols=True, disable=not show) as bar:
        for x, idx, errs in loader:
            ok = torch.tensor([not e for e in errs])
            probs = np.zeros((len(idx), 0))
            if ok.any():
                with autocast(torch.device(device), amp):
                    logits = model(x[ok].to(device, non_blocking=True)).float().cpu()  # (b, C)
                p = (torch.sigmoid(logits) if multilabel else logits.softmax(-1)).double().numpy()
                probs = np.zeros((len(idx), p.shape[1]))
                probs[ok.numpy()] = p
            yield idx, probs, errs
            bar.update(len(idx))


def _dist():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _em_finish(inputs: Inputs, out: Path, header, wheader, loc, names, k, train_priors) -> dict:
    """All posteriors are in: estimate the test priors (EM), write OUT from the corrected posteriors
    and OUT.posteriors.csv (index, path, prob_<class>..., error) as one merged file."""
    n, C = len(inputs.paths), len(names)
    P, errors, handles = np.zeros((n, C)), [""] * n, {}
    try:
        for i in range(n):
            cells = parse_line(line_at(handles, *loc[i]))  # path, C probabilities, error
            errors[i] = cells[-1]
            if not errors[i]:
                P[i] = [float(v) for v in cells[1:1 + C]]
    finally:
        for h in handles.values():
            h.close()
    ok = np.array([not e for e in errors])
    if not ok.any():
        raise RuntimeError(f"{out}: no image could be read, nothing to estimate priors from")
    corrected, info = correct(P[ok], "em", train_priors, names)
    Pc = P.copy()
    Pc[ok] = corrected
    merged = out.with_name(f"{out.name}.posteriors.csv")
    tmp = merged.with_name(f".{merged.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as w:  # index, path, the posteriors before the correction (calibrated with --calibration), error
        w.write(csv_line(wheader))
        w.writelines(csv_line([i, inputs.paths[i], *(f"{v:.8g}" for v in P[i]), errors[i]]) for i in range(n))
    os.replace(tmp, merged)
    for f in work_files(out, "posteriors"):
        if f != merged:
            f.unlink()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as w:
        w.write(csv_line(header))
        w.writelines(csv_line(_row(inputs, i, Pc[i], errors[i], names, k)) for i in range(n))
    os.replace(tmp, out)
    return info


def predict_to_csv(model, inputs: Inputs, out, class_names: list[str], image_size: int, *, top_k: int = 3,
                   batch_size: int = 32, workers: int = 0, device="cpu", amp=None, prior: str = "none",
                   train_priors=None, thresholds=None) -> dict:
    """Classify every input image into the CSV `out` (see the module docstring); resumes what is there.
    Under torch.distributed each rank calls this with the same arguments. Returns a summary dict."""
    out, (rank, world) = Path(out), _dist()
    names, k = list(class_names), max(1, min(top_k, len(class_names)))
    multi = thresholds is not None  # --task multilabel: sigmoid posteriors, each class over its threshold
    if multi and prior != "none":
        raise ValueError("--prior-correction applies to single-label posteriors, not to a --task multilabel model")
    header = multilabel_header(inputs, names) if multi else output_header(inputs, k)
    em, direct = prior == "em", world == 1 and prior != "em"
    kind = "posteriors" if em else "part"
    wheader = (["index", "path", *[f"prob_{c}" for c in names], "error"] if em else ["index", *header])
    if train_priors is None:
        train_priors = np.full(len(names), 1.0 / len(names))
    if em and out.exists() and not work_files(out, kind):
        raise FileExistsError(f"{out} exists but not its posteriors ({out.name}.posteriors.csv), which "
                              f"--prior-correction em needs: choose another --out or delete it")
    work = [] if direct else work_files(out, kind)
    loc = locate_rows(inputs, out, header, work, wheader, read_out=not em)
    _barrier()  # every rank has read the same files before any rank appends to them
    todo = [i for i in range(len(inputs.paths)) if i not in loc]
    mine = todo[rank::world]  # strided: no padding, no repeats
    target = out if direct else out.with_name(f"{out.name}.{kind}-{rank}.csv")
    sink, failed = Sink(target, header if direct else wheader), 0
    try:
        for idx, probs, errs in posteriors_batches(model, inputs, mine, image_size, batch_size, workers,
                                                   device, amp, show=rank == 0, multilabel=multi):
            ok = np.array([not e for e in errs])
            failed += int((~ok).sum())
            if probs.shape[1] == 0:  # not one readable image in this batch
                probs = np.zeros((len(idx), len(names)))
            if prior not in ("none", "em") and ok.any():  # known priors: each row on its own
                probs[ok] = correct(probs[ok], prior, train_priors, names)[0]
            if em:
                rows = [[i, inputs.paths[i], *(f"{v:.8g}" for v in p), e] for i, p, e in zip(idx, probs, errs)]
            else:
                rows = [_multilabel_row(inputs, i, p, e, names, thresholds) if multi else _row(inputs, i, p, e, names, k)
                        for i, p, e in zip(idx, probs, errs)]
                rows = rows if direct else [[i, *r] for i, r in zip(idx, rows)]
            sink.write(rows)
            sink.flush()
    finally:
        sink.close()
    _barrier()  # every rank's rows are on disk
    info = None
    if rank == 0 and not direct:
        work = work_files(out, kind)
        if em:
            loc = locate_rows(inputs, out, header, work, wheader, read_out=False)
            info = _em_finish(inputs, out, header, wheader, loc, names, k, train_priors)
            out.with_name(out.stem + ".priors.json").write_text(json.dumps(info, indent=2) + "\n")
        else:
            merge_rows(out, header, locate_rows(inputs, out, header, work, wheader), len(inputs.paths))
            for f in work:
                f.unlink()
    _barrier()
    return {"images": len(inputs.paths), "skipped_done": len(inputs.paths) - len(todo), "predicted": len(mine),
            "errors_this_rank": failed, "out": str(out), "prior_correction": info}


def run_thresholds(run, names: list[str]):
    """A --task multilabel run's per-class thresholds: F1-optimal on its kept epoch's validation logits
    (reports/multilabel.py tune_thresholds); None for a single-label run."""
    from ..calibration import read_val_logits
    from ..reports.multilabel import tune_thresholds

    cfg, _ = read_run(run)
    if cfg.task != "multilabel":
        return None
    logits, y, _, _ = read_val_logits(run)
    return tune_thresholds(torch.sigmoid(logits).numpy(), y.numpy())
