"""`latentsync-client VIDEO_OR_IMAGE AUDIO -o OUT.mp4`: lip-sync a file through a LatentSync Triton server.

Exit codes: 0 done, 1 unexpected error (a bug), 2 bad arguments, unsupported input or an output that cannot be
written there (all found before connecting), 3 server unreachable or connection lost, 4 server error, no face
found or stream dropped as idle, 5 writing failed (disk full, quota, I/O error), 130 interrupted.
Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import signal
import sys
from typing import Sequence

from latentsync_contract import (
    DEFAULT_GUIDANCE,
    DEFAULT_SEED,
    DEFAULT_STEPS,
    MAX_DEEPCACHE,
    MAX_GUIDANCE,
    MAX_STEPS,
    MODEL_NAME,
    SAMPLERS,
    VARIANTS,
    ContractError,
    StreamParams,
)

from .errors import ClientError, InputError, Interrupted, NoFaceError, ServerUnreachable
from .stream import LipsyncClient
from .sync import sync_file

PROG = "latentsync-client"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Lip-sync a video or photo to a voice track on a LatentSync Triton server.",
        epilog=__doc__.split("\n\n")[1],
    )
    p.add_argument("video", help="video (any fps, HEVC/h264/...) or still image")
    p.add_argument("audio", help="any file with an audio track (wav, mp3, m4a, a video...)")
    p.add_argument("-o", "--output", required=True, help="output video (.mp4: h264 + AAC)")
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC endpoint HOST:PORT (default %(default)s)")
    p.add_argument("--model", default=MODEL_NAME, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"DDIM steps, 1..{MAX_STEPS} (default %(default)s)")
    p.add_argument(
        "--guidance",
        type=float,
        default=DEFAULT_GUIDANCE,
        help=f"guidance scale, 1..{MAX_GUIDANCE:g}; 1 = no guidance (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="noise seed, 0..2^63-1 (default %(default)s)")
    p.add_argument(
        "--variant", choices=VARIANTS, help="1.5: 256 px, 1.6: 512 px faces (default: the server's first variant)"
    )
    p.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default="ddim",
        help="ddim (upstream's) or dpmsolver++ (about as good in half the steps) (default %(default)s)",
    )
    p.add_argument(
        "--deepcache",
        type=int,
        default=0,
        metavar="K",
        help=f"DeepCache: the full UNet every K-th step, cached deep features between (about 2x faster; "
        f"upstream's scripts use 3), 0..{MAX_DEEPCACHE}, 0 = off (default %(default)s)",
    )
    p.add_argument(
        "--enhance",
        action="store_true",
        help="restore the generated mouth region with the server's face enhancer (if it has one)",
    )
    p.add_argument(
        "--enhance-blend",
        type=float,
        default=1.0,
        metavar="B",
        help="0..1: how much of the restored mouth region replaces the generated one (default %(default)s)",
    )
    p.add_argument(
        "--enhance-min-sharpness",
        type=float,
        default=0.0,
        metavar="S",
        help="enhance only faces whose mouth is blurrier than S (Laplacian variance; 0 = every face)",
    )
    p.add_argument(
        "--max-yaw",
        type=float,
        default=0.0,
        metavar="DEG",
        help="pass frames whose face is turned further than DEG degrees through unchanged (a frontal "
        "template does not fit them), 0..90; 0 = off, sync every face (default)",
    )
    p.add_argument("--crf", type=int, default=18, help="x264 quality, 0..51, lower is better (default %(default)s)")
    p.add_argument("--preset", default="medium", help="x264 speed preset, ultrafast..placebo (default %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="x264 threads, 0..128; 0 = as many as suit this machine's cores (default); 1 per client where many "
        "clients share a machine",
    )
    p.add_argument(
        "--allow-no-face",
        action="store_true",
        help="write the output even if no frame had a face (it is then the input, re-timed)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="give up after this many seconds without a response (default %(default)s)",
    )
    p.add_argument("--tmp-dir", help="folder for replayed frames of looped videos (default: system temp)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    return p.parse_args(argv)


class ProgressBar:
    """tqdm bar of frames done with fps and ETA; created when the frame count is known."""

    def __init__(self, enabled: bool):
        self.enabled, self.bar = enabled, None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="frame", desc="lip-sync", dynamic_ncols=True, file=sys.stderr)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _raise_interrupted(signum, _frame):
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupted)  # same clean-up as Ctrl-C
    bar = ProgressBar(not a.quiet)
    try:
        try:
            params = StreamParams(
                steps=a.steps,
                guidance=a.guidance,
                seed=a.seed,
                variant=a.variant,
                sampler=a.sampler,
                deepcache=a.deepcache,
                enhance=a.enhance,
                enhance_blend=a.enhance_blend,
                enhance_min_sharpness=a.enhance_min_sharpness,
                max_yaw=a.max_yaw,
            )
        except ContractError as e:
            raise InputError(str(e)) from None
        client = LipsyncClient(a.url, a.model, response_timeout=a.timeout or None)
        result = sync_file(
            a.video,
            a.audio,
            a.output,
            client=client,
            params=params,
            progress=bar,
            require_face=not a.allow_no_face,
            crf=a.crf,
            preset=a.preset,
            threads=a.threads,
            spill_dir=a.tmp_dir,
        )
    except KeyboardInterrupt:
        bar.close()
        return _fail(Interrupted(f"interrupted; {a.output} was not written"))
    except NoFaceError as e:
        bar.close()
        hint = "" if a.allow_no_face else " (--allow-no-face writes the video anyway, re-timed with the audio)"
        return _fail(NoFaceError(f"{e}{hint}"))
    except ServerUnreachable as e:
        bar.close()
        hint = " (is that its HTTP port? the client speaks gRPC, Triton's port 8001 by default)"
        return _fail(ServerUnreachable(f"{e}{hint if a.url.rsplit(':', 1)[-1] == '8000' else ''}"))
    except ClientError as e:
        bar.close()
        return _fail(e)
    except Exception as e:  # a bug: still one line
        bar.close()
        return _fail(ClientError(f"{type(e).__name__}: {e}"))
    bar.close()
    if not a.quiet:
        note = f", {result.frames_without_face} without a face (passed through)" if result.frames_without_face else ""
        print(
            f"wrote {result.output}: {result.frames} frames, {result.duration:.2f} s at 25 fps{note} "
            f"in {result.seconds:.1f} s",
            file=sys.stderr,
        )
    return 0


def _fail(error: ClientError) -> int:
    print(f"{PROG}: error: {error}", file=sys.stderr)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
