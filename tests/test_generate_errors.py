"""Mistakes of the generation commands (`hpdm sample`, `hpdm eval-synthetic`, `hpdm export`) found by a probe: an
output inside a checkpoint or under a file, a generator with an invalid config or non-finite weights, options that
gave black or grey videos, unbounded -n and --seed. Each is one line and exit 2, and nothing is written or changed."""
import hashlib
import json
import logging
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from hpdm.cli import main
from hpdm.config import Config
from hpdm.model import HPDM
from tests.helpers import randomize, tiny_model_config
from tests.test_sampling import export_model

ROOT = Path(__file__).resolve().parents[1]
FAST = ("--steps", "1", "-n", "1")


def one_level(**diffusion) -> Config:
    cfg = Config(model=tiny_model_config(levels=1, levels_per_block=(1, 1, 1, 1)))
    for k, v in diffusion.items():
        setattr(cfg.diffusion, k, v)
    return cfg


def make_run(root: Path, cfg: Config) -> Path:
    """A run folder with one complete checkpoint of a random model (as the trainer lays it out)."""
    ckpt = root / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    save_file(randomize(HPDM(cfg.model), std=0.05).state_dict(), str(ckpt / "ema.safetensors"))
    save_file({"step": torch.zeros(1)}, str(ckpt / "rank_00000.safetensors"))
    (ckpt / "state.json").write_text(json.dumps({"step": 1, "samples": 1, "config": cfg.to_dict()}))
    (root / "checkpoints" / "latest").write_text(ckpt.name)
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("generate_errors")
    run = make_run(tmp / "run", one_level())
    (tmp / "link").symlink_to(run / "checkpoints" / "step_00000001")
    (tmp / "file").write_text("not a folder\n")
    gens = {}
    for name, diffusion in {"steps0": {"steps": 0}, "sigma_min": {"sigma_min": -1.0}, "guidance-5": {"guidance": -5.0},
                            "guidance1e30": {"guidance": 1e30}}.items():
        gens[name] = export_model(randomize(HPDM(one_level().model), std=0.05), one_level(**diffusion),
                                  tmp / f"{name}.safetensors")
    model = randomize(HPDM(one_level().model), std=0.05)
    name, weight = list(model.named_parameters())[-1]
    with torch.no_grad():
        weight.view(-1)[0] = float("nan")
    gens["nan"] = export_model(model, one_level(), tmp / "nan.safetensors")
    gens["good"] = export_model(randomize(HPDM(one_level().model), std=0.05), one_level(), tmp / "good.safetensors")
    bad_run = make_run(tmp / "bad_run", one_level())
    state = bad_run / "checkpoints" / "step_00000001" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "config": one_level(steps=0).to_dict()}))
    return {"tmp": str(tmp), "run": str(run), "ckpt": str(run / "checkpoints" / "step_00000001"),
            "bad_run": str(bad_run), "nan_tensor": name, **gens}


def error_line(args: list[str], capsys) -> str:
    """`hpdm ARGS` in this process: asserts exit 2 and one error line, without a traceback; returns the line."""
    capsys.readouterr()
    assert main(args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln or "Traceback" in ln]  # not progress
    assert len(err) == 1, err
    return err[0]


CKPT_PATH = "{tmp}/run/checkpoints/step_00000001"
INSIDE = {  # name: (arguments, what the error line says after `hpdm <command>: error: `)
    "eval --out state.json": (("eval-synthetic", "{run}", "--out", f"{CKPT_PATH}/state.json"),
                              f"--out: {CKPT_PATH}/state.json is inside the checkpoint {CKPT_PATH}, which it would "
                              "change; write elsewhere, e.g. {tmp}/run/result.json"),
    "eval --out latest": (("eval-synthetic", "{run}", "--out", "{run}/checkpoints/latest"),
                          "--out: {run}/checkpoints/latest is inside the checkpoints folder {run}/checkpoints"),
    "sample --out CKPT": (("sample", "{ckpt}", "--out", "{ckpt}"), f"--out: {CKPT_PATH} is the checkpoint {CKPT_PATH}, "
                                                                   "which it would change; write elsewhere, e.g. "
                                                                   "{tmp}/run/videos"),  # samples/ holds the trainer's
    "sample --out checkpoints": (("sample", "{run}", "--out", "{run}/checkpoints"),
                                 "--out: {run}/checkpoints is the checkpoints folder {run}/checkpoints"),
    "sample --out CKPT/sub": (("sample", "{run}", "--out", "{ckpt}/videos"),
                              f"--out: {CKPT_PATH}/videos is inside the checkpoint {CKPT_PATH}"),
    "sample --out a link to CKPT": (("sample", "{run}", "--out", "{tmp}/link/videos"),
                                    f"--out: {{tmp}}/link/videos is inside the checkpoint {CKPT_PATH}"),
    "export into CKPT": (("export", "{run}", "{ckpt}"),  # it suggested {ckpt}/model.safetensors, then refused it
                         f"out: {CKPT_PATH} is the checkpoint {CKPT_PATH}, which it would change; write elsewhere, "
                         "e.g. {tmp}/run/model.safetensors"),
    "export into checkpoints": (("export", "{run}", "{run}/checkpoints/model.safetensors"),
                                "out: {run}/checkpoints/model.safetensors is inside the checkpoints folder"),
}


@pytest.mark.parametrize("name", INSIDE)
def test_an_output_inside_a_checkpoint_is_refused_and_the_run_is_unchanged(paths, name, capsys):
    args, says = INSIDE[name]
    before = snapshot(Path(paths["run"]))
    line = error_line([a.format(**paths) for a in args], capsys)
    assert line.startswith(f"hpdm {args[0]}: error: {says.format(**paths)}"), line
    assert snapshot(Path(paths["run"])) == before


UNDER_A_FILE = {  # checked before the generator loads: a missing generator is not reached
    "export": ("export", "{tmp}/nothing", "{tmp}/file/y.safetensors"),  # a NotADirectoryError traceback
    "eval-synthetic": ("eval-synthetic", "{tmp}/nothing", "--out", "{tmp}/file/r.json"),  # after all the sampling
    "sample": ("sample", "{tmp}/nothing", "--out", "{tmp}/file/videos"),
}


@pytest.mark.parametrize("command", UNDER_A_FILE)
def test_an_output_under_a_file_is_refused_before_loading(paths, command, capsys):
    option = "out" if command == "export" else "--out"
    line = error_line([a.format(**paths) for a in UNDER_A_FILE[command]], capsys)
    assert line == (f"hpdm {command}: error: {option}: {paths['tmp']}/file is a file, so "
                    f"{paths['tmp']}/file/{Path(UNDER_A_FILE[command][-1]).name} cannot be created under it")


def test_an_output_in_a_folder_without_write_permission_is_refused(paths, capsys, monkeypatch):
    monkeypatch.setattr("hpdm.export.os.access", lambda path, mode, **kw: False)  # as root, who may write anywhere
    line = error_line(["eval-synthetic", paths["good"], "--out", f"{paths['tmp']}/new/r.json"], capsys)
    assert line == (f"hpdm eval-synthetic: error: --out: cannot write {paths['tmp']}/new/r.json: {paths['tmp']} is "
                    "not writable by this user")


GENERATORS = {  # name: (generator, what the error says after `hpdm sample: error: `)
    "diffusion.steps 0": ("{steps0}", "{steps0}: its config metadata is not a valid hpdm config (diffusion.steps: "
                                      "must be >= 1; got 0)"),  # a uniform grey video, exit 0
    "diffusion.sigma_min -1": ("{sigma_min}", "{sigma_min}: its config metadata is not a valid hpdm config "
                                              "(diffusion.sigma_min: must be > 0; got -1.0)"),  # a TypeError
    "diffusion.guidance -5": ("{guidance-5}", "{guidance-5}: its config metadata is not a valid hpdm config "
                                              "(diffusion.guidance: must be >= 0; got -5.0)"),
    "state.json": ("{bad_run}", "{bad_run}/checkpoints/step_00000001/state.json: its config is not a valid hpdm "
                                "config (diffusion.steps: must be >= 1; got 0)"),
    "NaN weights": ("{nan}", "{nan}: tensor '{nan_tensor}' holds NaN or infinite values"),  # a black video
    "missing": ("{tmp}/nothing", "{tmp}/nothing does not exist"),
}


@pytest.mark.parametrize("command", ["sample", "eval-synthetic"])
@pytest.mark.parametrize("name", GENERATORS)
def test_a_broken_generator_is_refused_when_loaded(paths, name, command, capsys):
    gen, says = GENERATORS[name]
    out = Path(paths["tmp"]) / f"out_{command}_{name}".replace(" ", "_")
    args = [command, gen.format(**paths), *FAST] + (["--out", str(out)] if command == "sample" else [])
    line = error_line(args, capsys)
    assert line.startswith(f"hpdm {command}: error: {says.format(**paths)}"), line
    assert not list(out.glob("*.mp4"))


OPTIONS = {  # option values that gave black or grey videos, or a traceback, with exit 0
    "--guidance 1e30": (("--guidance", "1e30"), "--guidance: must be <= 100; got 1e+30"),  # black
    "--fine-start 1e30": (("--fine-start", "1e30"), "--fine-start: must be <= the model's diffusion.sigma_max (80); "
                                                    "got 1e+30"),  # grey
    "--seed 1e20": (("--seed", "99999999999999999999"), "--seed: must be in [0, 4294967296); got 99999999999999999999"),
    "--seed -5": (("--seed", "-5"), "--seed: must be in [0, 4294967296); got -5"),  # eval-synthetic ran
    "-n 1e12": (("-n", "999999999999"), "-n: must be <= 10,000,000; got 999,999,999,999"),  # an allocation error
}


@pytest.mark.parametrize("command", ["sample", "eval-synthetic"])
@pytest.mark.parametrize("name", OPTIONS)
def test_sampling_options_are_bounded(paths, name, command, capsys):
    args, says = OPTIONS[name]
    out = ["--out", f"{paths['tmp']}/out_options"] if command == "sample" else []
    line = error_line([command, paths["good"], *out, "--steps", "1", *args], capsys)
    assert line == f"hpdm {command}: error: {says}"


def test_eval_synthetic_refuses_more_videos_than_memory_holds(paths, capsys):
    line = error_line(["eval-synthetic", paths["good"], "-n", "10000000"], capsys)
    assert re.fullmatch(r"hpdm eval-synthetic: error: -n: 10,000,000 videos keep [\d,]+ GiB of canvases in memory for "
                        r"the measure, more than this machine's [\d,]+ GiB; give fewer", line), line


@pytest.mark.parametrize("command", ["sample", "eval-synthetic"])
def test_non_finite_videos_are_not_written(paths, command, capsys):
    """diffusion.guidance 1e30 passes the config's checks (>= 0); its videos were written black, exit 0."""
    out = Path(paths["tmp"]) / f"out_nonfinite_{command}"
    json_out = out / "result.json"
    args = ["--out", str(out)] if command == "sample" else ["--out", str(json_out)]
    line = error_line([command, paths["guidance1e30"], "--steps", "3", "-n", "1", *args], capsys)
    assert line.startswith(f"hpdm {command}: error: the network produced non-finite values at level 0 with guidance "
                           "1e+30; stopped before writing or measuring them"), line
    assert not list(out.glob("*.mp4")) and not json_out.exists()


def test_the_loaded_checkpoint_is_logged(paths, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="hpdm.export"):
        assert main(["eval-synthetic", paths["run"], *FAST]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "hpdm.export"] == [
        f"loading the EMA weights of {paths['ckpt']}/ema.safetensors"]


def test_docs_launch_hpdm_with_deepspeeds_module_flag():
    """DeepSpeed 0.19 refuses `deepspeed -m` ("unrecognized arguments: -m"); it takes --module."""
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        wrong = [ln for ln in doc.read_text().splitlines() if re.search(r"\bdeepspeed\b.* -m hpdm", ln)]
        assert not wrong, (doc, wrong)


def test_export_still_writes_outside_the_checkpoints(paths, tmp_path):
    out = tmp_path / "sub" / "model.safetensors"
    assert main(["export", paths["run"], str(out)]) == 0
    from safetensors import safe_open  # noqa: PLC0415

    with safe_open(str(out), framework="pt") as f:
        assert yaml.safe_load(f.metadata()["config"])["model"]["levels"] == 1
    # an export says where it came from, whatever folder it is later read from (it held the path as typed, and no
    # step or sample count)
    from hpdm.export import load_generator  # noqa: PLC0415

    ckpt = (Path(paths["run"]) / "checkpoints" / "step_00000001").resolve()
    state = json.loads((ckpt / "state.json").read_text())
    _, model = load_generator(out)
    assert model.provenance == {"generator": str(out.resolve()), "weights": str(out.resolve()), "raw": False,
                                "exported_from": str(ckpt), "step": state["step"], "samples": state["samples"]}


@pytest.mark.parametrize("name", ["grid.png", "grid_rank1.png", "cost.json", "prompts.json"])
def test_sample_refuses_an_out_holding_any_file_it_writes(paths, name, tmp_path, capsys):
    """Only *.mp4 files were checked: an earlier sample's grid, cost or prompts were overwritten."""
    (tmp_path / name).write_text("precious\n")
    line = error_line(["sample", paths["good"], "--out", str(tmp_path), *FAST], capsys)
    assert line == (f"hpdm sample: error: --out: {tmp_path} already holds the output of a sample ({name}), which new "
                    "ones would join or replace; give an empty or new folder")
    assert (tmp_path / name).read_text() == "precious\n"


def test_export_overwrites_only_its_own_export(paths, tmp_path, capsys):
    """`hpdm export RUN notes.txt` replaced any file, another model's safetensors too; its own export it may."""
    (tmp_path / "notes.txt").write_text("precious\n")
    save_file({"w": torch.ones(2)}, str(tmp_path / "other.safetensors"), metadata={"config": "model: {}"})
    for name in ("notes.txt", "other.safetensors"):
        before = (tmp_path / name).read_bytes()
        line = error_line(["export", paths["run"], str(tmp_path / name)], capsys)
        assert line == (f"hpdm export: error: out: {tmp_path / name} exists and was not written by `hpdm export`; "
                        "give a new file name (or remove it first)")
        assert (tmp_path / name).read_bytes() == before
    out = tmp_path / "model.safetensors"
    assert main(["export", paths["run"], str(out)]) == 0 and main(["export", paths["run"], str(out)]) == 0


def test_guidance_without_cond_dropout_warns(caplog):
    """A model trained with model.cond_dropout 0 has an untrained unconditional branch: guidance used it silently."""
    from hpdm.sampling import SampleOptions, TiledSampler  # noqa: PLC0415

    cfg = one_level(guidance=2.0)
    cfg.model.cond_dropout = 0.0
    for guidance, says in ((None, "guidance 2 (diffusion.guidance)"), (3.0, "guidance 3 (--guidance)"), (1.0, None)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hpdm.sampling"):
            TiledSampler(HPDM(cfg.model), cfg, SampleOptions(guidance=guidance))
        assert [r.getMessage() for r in caplog.records if r.name == "hpdm.sampling"] == ([] if says is None else [
            f"{says} needs a model trained with model.cond_dropout > 0, and this one's is 0: its unconditional branch "
            "was not trained, so the videos may be meaningless; use --guidance 1"])


def test_what_was_sampled_is_recorded_and_lossless_videos_hold_the_samples(paths, tmp_path, monkeypatch):
    """A probe: nothing beside the videos or in eval-synthetic's JSON said which weights, seed, classes or sampler
    settings made them (random classes could be told only by sampling again), the mp4s were 4:2:0 (the synthetic
    measure of the files: 0.33 where the samples scored 0.48), they played at 8 fps whatever the data's rate, and
    the grid kept every video whole in memory (26 GB for HPDM-S's 2,048)."""
    import av
    import numpy as np
    from PIL import Image

    import hpdm.generate
    from hpdm.generate import conditions
    from hpdm.sampling import level_steps
    from hpdm.video_io import clip_fps

    cfg = one_level()
    run, out = paths["run"], tmp_path / "s"
    monkeypatch.setattr(hpdm.generate, "GRID_VIDEOS", 2)
    out.mkdir()
    (out / "sample.json").write_text('{"sampler": {}}')  # of a run stopped before its first video: no reason to refuse
    (out / "prompts.json").write_text("{}")  # which a text model's run writes first too
    assert main(["sample", run, "--out", str(out), "-n", "3", "--seed", "5", "--steps", "2", "--lossless"]) == 0
    record = json.loads((out / "sample.json").read_text())
    ckpt = Path(run) / "checkpoints" / "step_00000001"
    samples = json.loads((ckpt / "state.json").read_text())["samples"]
    assert record["generator"] == {"generator": str(Path(run).resolve()), "weights": str(ckpt / "ema.safetensors"),
                                   "raw": False, "step": 1, "samples": samples}
    assert record["seed"] == 5 and record["videos"] == 3 and record["label"] is None and record["lossless"]
    assert record["labels"] == conditions("class", cfg.model.num_classes, 3, seed=5).labels.tolist()
    assert record["sampler"]["steps"] == level_steps(2, 1) and record["sampler"]["guidance"] == cfg.diffusion.guidance
    assert record["sampler"]["s_churn"] == cfg.diffusion.s_churn and record["fps"] == 8.0  # native rates: unknown
    grid = np.asarray(Image.open(out / "grid.png"))  # lossless: the mp4 holds the frames that the grid shows
    with av.open(str(out / "video_00000.mp4")) as f:
        assert f.streams.video[0].average_rate == 8
        frames = np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])
    t, h, w = frames.shape[:3]
    assert grid.shape[0] == 2 * h  # the first 2 of the 3 videos
    idx = np.linspace(0, t - 1, min(8, t)).round().astype(int)
    assert np.array_equal(grid[:h, :w * len(idx)], np.concatenate(list(frames[idx]), axis=1))

    synthetic, resampled = one_level(), one_level()
    synthetic.data.synthetic, resampled.data.fps, resampled.data.frame_stride = True, 30.0, 2
    assert (clip_fps(synthetic), clip_fps(resampled)) == (24.0, 15.0)  # what the videos of such runs play at

    result = tmp_path / "e.json"
    assert main(["eval-synthetic", run, "-n", "2", "--steps", "1", "--seed", "4", "--out", str(result)]) == 0
    sampled = json.loads(result.read_text())["sampled"]
    assert sampled["generator"] == record["generator"] and sampled["seed"] == 4
    assert sampled["videos"] == 2 and sampled["sampler"]["steps"] == [1]


def test_options_without_effect_on_the_model_are_warned(caplog):
    from hpdm.sampling import SampleOptions, TiledSampler  # noqa: PLC0415

    cfg = one_level()
    cfg.model.cond = "none"
    with caplog.at_level(logging.WARNING, logger="hpdm.sampling"):
        sampler = TiledSampler(HPDM(cfg.model), cfg, SampleOptions(guidance=3.0, fine_start=0.5, coarse="clean"))
    assert sampler.guidance == 1.0  # both branches would be the same call
    assert [r.getMessage() for r in caplog.records if r.name == "hpdm.sampling"] == [
        "--guidance: no effect on an unconditional model (it has no condition to drop)",
        "--fine-start, --coarse: no effect on a one-level model (they set how finer levels are sampled)"]
