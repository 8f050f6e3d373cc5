"""Plant a pickle that runs code into every file kind of an ordinary and a universal checkpoint, then resume,
convert and read raw weights from each copy. Prints one JSON line per case: what was raised, and whether the
payload ran. Usage: python planted_pickles.py RUN_DIR TAG (a run with checkpoints TAG and TAG_universal)."""
import json
import os
import shutil
import sys
from pathlib import Path

import deepspeed
import torch

from hpdm.checkpoint import Checkpointer
from hpdm.checkpoint_folder import read_state
from hpdm.config import Config, from_dict
from hpdm.convert import convert_to_universal
from hpdm.distributed import init_distributed
from hpdm.ds_config import deepspeed_config
from hpdm.ema import EMA
from hpdm.export import _raw_weights
from hpdm.model import HPDM
from hpdm.optim import build_optimizer

src = Path(sys.argv[1]) / "checkpoints"
marker = Path(sys.argv[1]) / "PAYLOAD_RAN"
tag = sys.argv[2]


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {marker}",)


def engine_for(cfg: Config, universal: bool):
    model = HPDM(cfg.model)
    t = cfg.train
    opt = build_optimizer(model, t.optimizer, t.lr, t.betas, t.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(cfg, 1, load_universal=universal))
    return engine, EMA(model, t.ema_halflife)


def plant(folder: str, name: str) -> Path:
    """A copy of checkpoint ``folder`` (alone in a fresh run folder) with ``name`` replaced by the payload."""
    run = Path(sys.argv[1]) / "planted"
    shutil.rmtree(run, ignore_errors=True)
    shutil.copytree(src / folder, run / "checkpoints" / folder)
    (run / "checkpoints" / "latest").write_text(folder)
    path = run / "checkpoints" / folder
    torch.save({"module": Payload(), "param": Payload()}, path / name)
    state = json.loads((path / "state.json").read_text())  # as a forger would: sizes agree, only the pickle is caught
    state["files"][name] = (path / name).stat().st_size
    (path / "state.json").write_text(json.dumps(state))
    return path


def attempt(case: str, fn) -> None:
    marker.unlink(missing_ok=True)
    try:
        fn()
        error = None
    except Exception as exc:  # noqa: BLE001 (reported)
        error = f"{type(exc).__name__}: {exc}"
    print(json.dumps({"case": case, "error": error, "ran": marker.exists()}), flush=True)


init_distributed()
cfg = from_dict(Config, read_state(src / tag)["config"])
ordinary, universal = engine_for(cfg, False), engine_for(cfg, True)
def resume(engine, folder: str, name: str):
    path = plant(folder, name)
    Checkpointer(path.parent.parent).load(*engine, path)


def raw(name: str):
    path = plant(tag, name)
    (path / "raw.safetensors").unlink()  # as in checkpoints from before raw.safetensors: DeepSpeed's file is read
    _raw_weights(path)


attempt("resume intact", lambda: Checkpointer(src).load(*ordinary, src / tag))
attempt("resume universal intact", lambda: Checkpointer(src).load(*universal, src / f"{tag}_universal"))
param = "blocks.0.write.attn.kv.weight"
for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
    attempt(f"resume {name}", lambda: resume(ordinary, tag, name))
    attempt(f"convert {name}", lambda: convert_to_universal(plant(tag, name)))
attempt("raw weights mp_rank_00_model_states.pt", lambda: raw("mp_rank_00_model_states.pt"))
for name in ("mp_rank_00_model_states.pt", "zero/optimizer_state.pt", *(f"zero/{param}/{k}.pt" for k in ("fp32", "exp_avg", "exp_avg_sq", "step"))):
    attempt(f"resume universal {name}", lambda: resume(universal, f"{tag}_universal", name))
