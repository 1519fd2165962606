"""`latentsync-bench` against a real tiny Triton server: the serving-overhead and cross-stream batching guards,
and a CPU dry run of the GPU script (latentsync-gpu-bench) so it is known to work when a GPU is lent."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import helpers
import numpy as np
import pytest

from latentsync_load.bench import BenchOptions, another_pair, markdown, run

REPO = Path(__file__).resolve().parents[1]
MIN_WINDOWS_AT_4 = 3.0  # mean 16-frame windows per UNet step at 4 concurrent streams
MAX_OVERHEAD = 0.10  # Triton wall time / in-process wall time - 1


@pytest.fixture(scope="module")
def clip(shared_dir) -> Path:
    """A real close-up talking face (any clip of ../shared/media with a face works)."""
    return shared_dir / "media" / "retalking_face2.mp4"


@pytest.fixture(scope="module")
def report(clip) -> dict:
    # One 16-frame window per stream at 256 px, tiny weights: small enough for 2 CPU cores, still every model and
    # every BLS call. 10 steps (the recipe has 20): the streams reach their first UNet step at different times
    # (the first step may run as up to 4 groups), after that they step together; at 2 steps that transient
    # alone decided the mean batch, which is not what a served stream sees.
    # The overhead gate is on CPU time: the serving path's (every server process and the client) against the
    # in-process pipeline's process. On CI's shared 2-core VM identical runs' wall times differed up to 2.3x
    # (Triton 39.6-91.4 s in one run here, steal time up to 31 %) while their CPU times stayed within 9 %
    # (67.9-73.5 s; in a slow hour 164.5 and 164.7 s at 108.8 and 141.1 s of wall), so wall time could only be
    # gated by many pairs: 8 pairs ran past the 30-minute timeout in CI. Best of 2 pairs; while the CPU
    # overhead is at or above the gate, more, up to 4 and none started after 10 minutes (a pair took 3.5-4
    # minutes in a slow hour here), so the module stays inside its timeout.
    opts = BenchOptions(
        video=clip,
        tiny=True,
        size=256,
        seconds=0.56,
        steps=10,
        streams=[4],
        repeats=2,
        overhead_goal=MAX_OVERHEAD,
        max_repeats=4,
        overhead_budget_s=600,
    )
    return run(opts)


def _cpu_overhead(report: dict, runs: int) -> float:
    """The CPU overhead from the first `runs` pairs."""
    return min(report["triton"]["cpu_runs_s"][:runs]) / min(report["reference"]["cpu_runs_s"][:runs]) - 1.0


@pytest.mark.server
@pytest.mark.slow
def test_serving_overhead_under_10_percent(report):
    """Triton path vs the in-process pipeline on the same weights and frames, best of 2 to 4 interleaved runs
    each (both with the server's malloc settings): the serving path (server processes and client) must cost
    under 10 % more CPU time. Wall time is reported, not gated (see the fixture)."""
    print(markdown(report))
    assert report["faces_found"].split("/")[0] == report["faces_found"].split("/")[1]
    runs = len(report["triton"]["runs_s"])
    assert runs == len(report["reference"]["cpu_runs_s"]) and 2 <= runs <= 4
    assert all(x > 0 for x in report["triton"]["cpu_runs_s"] + report["reference"]["cpu_runs_s"])
    assert runs == 2 or _cpu_overhead(report, runs - 1) >= MAX_OVERHEAD  # another pair only while over the gate
    assert report["cpu_overhead"] == _cpu_overhead(report, runs)
    assert report["cpu_overhead"] < MAX_OVERHEAD, (report["triton"]["cpu_runs_s"], report["reference"]["cpu_runs_s"])


def test_another_pair_only_while_over_the_goal_below_max_and_within_budget():
    opts = BenchOptions(video=Path("x"), repeats=2, overhead_goal=0.1, max_repeats=4, overhead_budget_s=600)
    assert another_pair(opts, 2, 0.1, 0.0)  # at the goal: not met
    assert not another_pair(opts, 2, 0.09, 0.0)  # met
    assert another_pair(opts, 3, 0.5, 599.0)
    assert not another_pair(opts, 4, 0.5, 0.0)  # max_repeats
    assert not another_pair(opts, 3, 0.5, 600.0)  # budget spent
    assert another_pair(BenchOptions(video=Path("x"), overhead_goal=0.1, max_repeats=3), 2, 0.5, 1e9)  # no budget
    assert not another_pair(BenchOptions(video=Path("x"), max_repeats=8), 2, 0.5, 0.0)  # no goal


@pytest.mark.server
@pytest.mark.slow
def test_four_streams_share_unet_steps(report):
    """The denoiser advances the windows of concurrent streams together (its window_steps / steps counters)."""
    (four,) = [c for c in report["concurrency"] if c["streams"] == 4]
    assert not four["errors"]
    assert four["frames"] == 4 * report["frames_per_stream"]
    assert four["windows_per_unet_step"] >= MIN_WINDOWS_AT_4, four


@pytest.mark.server
@pytest.mark.slow
def test_report_covers_stages_and_memory(report):
    stages = report["stage_ms_per_frame"]
    for stage in (
        "decode",
        "detect",
        "align",
        "audio",
        "unet",
        "unet_step",
        "vae_encode",
        "vae_decode",
        "paste_back",
        "encode",
    ):
        assert stages[stage] > 0, stage
    models = report["triton"]["server_per_model"]
    assert {"lipsync", "face_detector", "vae_encoder", f"denoiser_{report['variant']}", "restorer"} <= set(models)
    memory = report["memory"]
    assert memory["server_peak_bytes"] > memory["client_peak_bytes"] > 0
    assert memory["reference_peak_bytes"] > 0
    json.dumps(report)  # the --json output


def run_gpu_script(tmp_path, shared_dir, *args) -> dict:
    result = helpers.run_gpu_script(tmp_path, shared_dir, *args)
    assert not [n for n in result["notes"] if "failed" in n], result["notes"]
    return result


@pytest.mark.slow
def test_gpu_script_dry_run(tmp_path, shared_dir):
    """The GPU script's (a) (one scaled-down UNet step and what follows from it) and (b) up to its repository
    ((b)'s server part: test_gpu_bundle.py::test_gpu_script_served_path; (c): the slow test below)."""
    result = run_gpu_script(tmp_path, shared_dir, "--parts", "unet,served", "--variants", "1.5", "--batches", "2")
    (row,) = result["unet"]
    assert row["batch"] == 2 and row["eager_ms"] > 0 and row["tflop_per_step"] > 0 and row["peak_fraction"] > 0
    assert row["unet_fps"] > row["fps"] > 0  # the VAE's time per window counts in fps
    assert row["reused_ms"] > 0 and row["fps_deepcache"] > 0 and row["fps_dpm10"] > row["fps"]
    assert any("repository built" in n for n in result["notes"])
    assert "| 1.5 | 2 | 1 |" in (tmp_path / "out" / "gpu_bench.md").read_text()


def test_gpu_script_served_options_reach_the_repository(tmp_path, shared_dir):
    """(b)'s --served-max-windows and --served-instances (the next GPU run's experiments: fewer compiled batch sizes,
    the orchestrator's CUDA context off the GPU) are what the built repository serves, and its report says so;
    a bad spec stops the run before anything is measured."""
    result = run_gpu_script(
        tmp_path, shared_dir, "--parts", "served", "--served-max-windows", "3",
        "--served-instances", "lipsync=cpu:2", "--served-instances", "restorer=gpu",
    )  # fmt: skip
    (repository,) = [n for n in result["notes"] if n.startswith("(b) repository: ")]
    assert "denoiser_1.5 cpu x1 (max_windows 3)" in repository
    assert "lipsync cpu x2" in repository and "restorer gpu x1" in repository and "vae_encoder cpu x1" in repository
    assert result["settings"]["served_instances"] == {"lipsync": "cpu:2", "restorer": "gpu"}
    refused = (
        ("lipsync=cpux", "KIND[:COUNT"),
        ("lipsync", "MODEL=KIND"),
        ("lipsinc=cpu", "no such model"),
        ("denoiser_1.6=gpu", "no such model"),  # (b) serves 1.5 unless --served-variants says otherwise
    )
    for i, (bad, message) in enumerate(refused):
        with pytest.raises(subprocess.CalledProcessError) as failed:
            run_gpu_script(tmp_path / f"bad{i}", shared_dir, "--parts", "served", "--served-instances", bad)
        assert failed.value.returncode == 2 and message in failed.value.stderr.decode()


def test_gpu_script_served_baseline_builds_the_targets_placement_and_the_chosen_one(tmp_path, shared_dir):
    """--served-baseline: (b) measures the target's own placement and then --served-instances' in one call (one
    card, one build: the comparison the next GPU run makes), each from its own repository."""
    result = run_gpu_script(
        tmp_path, shared_dir, "--parts", "served", "--served-baseline", "--served-instances", "lipsync=gpu:2"
    )
    repositories = [n for n in result["notes"] if n.startswith("(b) repository: ")]
    assert len(repositories) == 2
    assert "lipsync cpu x1" in repositories[0] and "lipsync gpu x2" in repositories[1]
    assert result["settings"]["served_baseline"] is True


def test_a_served_level_is_cut_off_at_its_deadline_and_counts_what_it_received():
    """The prepared GPU run must end inside its device time: a level still running at the budget's end stops, its
    row keeps the frames received and says it was cut off (not an error)."""
    from latentsync_load import gpu_serving as g

    class Silent:  # a server that accepts the stream and never answers
        def __init__(self, url, callback):
            pass

        def close(self, cancel=False):
            pass

    class NoGpu:
        mean = None

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    row, server = g.ServedRow("1.5", 2), SimpleNamespace(grpc_url="", metrics_url="")
    frames, audio = np.zeros((16, 8, 8, 3), np.uint8), np.zeros(640, np.float32)
    with (
        mock.patch("latentsync_client.grpc_stream.InferStream", Silent),
        mock.patch.object(g, "send_request"),
        mock.patch.object(g, "read_counters", lambda url, names, model: dict.fromkeys(names, 0.0)),
        mock.patch.object(g, "GpuSampler", NoGpu),
    ):
        g.measure_level(server, row, frames, audio, 20, 0, 1, timeout=30.0, deadline=time.perf_counter() + 0.5)
    assert row.errors == [] and row.frames == 0 and row.wall_s < 5
    assert "2 streams cut off at the time budget" in row.note


def test_gpu_script_served_layouts_retry_on_the_cpu_only_what_the_user_left_to_the_target():
    from latentsync_load.gpu_bench import Settings, check_served_instances, parse_args, served_layouts

    assert served_layouts({}, "gpu") == [("", {}), ("lipsync=cpu (retry)", {"lipsync": "cpu"})]
    assert served_layouts({"restorer": "cpu"}, "gpu")[1] == (
        "restorer=cpu, lipsync=cpu (retry)",
        {"restorer": "cpu", "lipsync": "cpu"},
    )
    for chosen in ({"lipsync": "gpu:2"}, {"lipsync": "cpu"}):  # the user's placement is what is measured
        assert served_layouts(chosen, "gpu") == [(f"lipsync={chosen['lipsync']}", chosen)]
    assert served_layouts({}, "cpu") == [("", {})]

    with pytest.raises(SystemExit):  # argparse: exit 2
        parse_args(["--served-instances", "lipsync=cpu", "--served-instances", "lipsync=gpu:2"])
    gpu_ids = Settings(served_instances={"restorer": "gpu:1:0,3"})
    assert "has 2 GPU(s)" in check_served_instances(gpu_ids, gpus=2)
    assert check_served_instances(gpu_ids, gpus=4) is None
    assert check_served_instances(Settings(served_instances={"x": "cpu"}, parts=["unet"])) is None  # (b) not run


def test_gpu_script_reads_each_buckets_compile_time_from_the_server_log():
    from latentsync_load.gpu_serving import compile_times

    log = (
        'I1205 13:07:10.694400 2948 metrics.py:58] "denoiser_1.5: UNet on cuda:0 in torch.bfloat16, compiled (x)"\n'
        'I1205 13:08:31.974229 2948 metrics.py:58] "denoiser_1.5: UNet compiled (reduce-overhead) for 2 items of 16 '
        'frames in 81 s"\n'
        'I1205 13:09:35.104229 2948 metrics.py:58] "denoiser_1.5: UNet compiled (reduce-overhead) for 4 items of 16 '
        'frames in 64 s"\n'
        'I1205 13:09:40.104229 2950 metrics.py:58] "denoiser_1.6: UNet compiled (default) for 2 items of 16 frames in '
        '90 s"\n'
    )
    assert compile_times(log) == "denoiser_1.5: 2 items 81 s, 4 items 64 s; denoiser_1.6: 2 items 90 s"
    assert compile_times("I1205 ... lipsync ready") == ""


@pytest.mark.slow
def test_gpu_script_precision_dry_run(tmp_path, shared_dir):
    """(c) on the CPU: bfloat16 against float32 on a window of 2 real face frames, one step (slow here: a bfloat16
    convolution runs ~50x slower than float32 on a CPU without AVX512-BF16)."""
    result = run_gpu_script(tmp_path, shared_dir, "--parts", "precision", "--precision-variants", "1.5")
    (precision,) = result["precision"]
    assert precision["frames"] == precision["faces"] == 2  # MediaPipe found the real face
    assert 0 < precision["max_latent_diff"] < precision["latent_scale"]  # bfloat16 differs, within the scale
    assert precision["max_pixel_diff"] > 0


def test_option_costs_dry_run(tmp_path):
    """latentsync-option-costs on scaled-down models: every recipe's UNet calls follow DeepCache's plan, its cost
    is that arithmetic on the measured calls, and the report is written."""
    from latentsync_load.option_costs import main

    assert main(["--tiny", "--iters", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "options.json").read_text())
    costs, rows = report["costs"], {r["recipe"].split(" (")[0]: r for r in report["recipes"]}
    assert [(r["full_steps"], r["reused_steps"]) for r in rows.values()] == [(20, 0), (7, 13), (10, 0), (4, 6)]
    scripts = rows["ddim 20 + deepcache 3"]
    expected = (7 * costs["unet_step_ms"] + 13 * costs["reused_step_ms"]) / costs["frames"]
    assert scripts["unet_ms_per_frame"] == pytest.approx(expected)
    assert 0 < costs["reused_step_ms"] < costs["unet_step_ms"] and costs["enhancer_face_ms"] > 0
    assert "upstream's scripts" in (tmp_path / "options.md").read_text()


def test_gpu_script_geometry_dry_run(tmp_path, shared_dir):
    """(d) on the CPU: the comparison runs at both resolutions on real frames, and a device that is the CPU itself
    differs nowhere (on a GPU the table says how far the CUDA kernels are from the golden-pinned CPU path)."""
    result = run_gpu_script(tmp_path, shared_dir, "--parts", "geometry")
    assert [(r["resolution"], r["frames"]) for r in result["geometry"]] == [(256, 2), (512, 2)]
    for row in result["geometry"]:
        assert row["crop_differ"] == row["face_differ"] == row["paste_differ"] == 0
        assert row["device_ms"] > 0 and row["cpu_ms"] > 0
    assert "#### (d) Alignment and paste-back" in (tmp_path / "out" / "gpu_bench.md").read_text()


def test_cpu_use_counts_page_faults_and_kernel_time_apart():
    """The stand-in bench's kernel share (`system_cpu_ms_per_frame`) and faults come from /proc per process."""
    import os
    import resource

    import numpy as np

    from latentsync_load.server_probe import cpu_use

    before = cpu_use(os.getpid())
    fresh = np.ones(64 << 20, np.uint8)  # 64 MB of fresh pages: faulted in and zeroed by the kernel
    used = cpu_use(os.getpid()) - before
    assert fresh[-1] == 1
    assert used.minor_faults >= 32  # one per 2 MB page at least (huge pages), else one per 4 kB
    # the right fields of /proc/PID/stat: as getrusage reads them, to a clock tick or two
    own, rusage = cpu_use(os.getpid()), resource.getrusage(resource.RUSAGE_SELF)
    assert abs(own.user - rusage.ru_utime) < 0.03 and abs(own.system - rusage.ru_stime) < 0.03
    assert abs(own.minor_faults - rusage.ru_minflt) < 100
    assert own.seconds == own.user + own.system


def test_ceiling_report_shows_each_process_cpu_with_its_kernel_share_and_faults():
    from latentsync_load import ceiling

    report = json.loads((REPO / "results" / "cpu" / "ceiling" / "ceiling.json").read_text())
    ceiling.markdown(report)  # a report from before the kernel's share was measured still renders
    level = report["levels"][0]
    names = sorted(level["cpu_ms_per_frame"])
    level["server_cpu_ms_per_frame"] = sum(level["cpu_ms_per_frame"].values())
    level["system_cpu_ms_per_frame"] = {name: 0.5 for name in names} | {"lipsync": 11.25}
    level["minor_faults_per_frame"] = {name: 10 for name in names} | {"lipsync": 1023}
    level["server_system_cpu_ms_per_frame"] = sum(level["system_cpu_ms_per_frame"].values())
    row = next(
        line for line in ceiling.markdown(report).splitlines() if re.search(r"\| [\d.]+ / [\d.]+ / [\d,]+ \|", line)
    )
    cells = [c.strip() for c in row.strip("|").split("|")][2:]
    assert cells[names.index("lipsync")] == f"{level['cpu_ms_per_frame']['lipsync']:.1f} / 11.2 / 1,023"
    assert cells[-1].endswith(f"/ {10 * (len(names) - 1) + 1023:,}")


def test_gpu_script_names_the_model_of_each_process_that_holds_the_card():
    """(b) lists who holds GPU memory by model (a Triton Python stub's command line names its model.py), so a run
    that placed lipsync on the CPU shows whether it still made a CUDA context."""
    from latentsync_load import gpu_serving as g

    program = "print('up', flush=True); import time; time.sleep(30)"
    stub = subprocess.Popen([sys.executable, "-c", program, "/models/repo/lipsync/1/model.py"], stdout=subprocess.PIPE)
    try:
        assert stub.stdout.readline() == b"up\n"  # running its program: /proc shows its command line, not a fork's
        assert g.process_model(str(stub.pid)) == "lipsync"
    finally:
        stub.kill()
        stub.communicate()  # reaped, its pipe closed
    assert g.process_model("999999999") == "pid 999999999"
    with mock.patch.object(g.subprocess, "run", side_effect=FileNotFoundError("nvidia-smi")):
        assert g.cuda_contexts() == ""
    answer = SimpleNamespace(stdout=f"{stub.pid}, 512\n")
    with mock.patch.object(g.subprocess, "run", return_value=answer), mock.patch.object(g, "process_model", str):
        assert g.cuda_contexts() == f"{stub.pid} 512 MiB"
