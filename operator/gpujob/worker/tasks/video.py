"""render_video: render an animated Julia-set fly-through with torch and encode it to H.264 MP4 (PyAV).

Stands in for a real generator (ComfyUI, a video diffusion model): frames made on the GPU, encoded, uploaded
to videos/<jobId>/video.mp4. Encoding goes in segments of raw H.264 (Annex B, which may be concatenated): a
checkpoint closes the current segment and stores the bytes so far, so a resumed attempt only renders the
frames that are missing and the final file is one remux of all segments. Each checkpoint uploads only
the segment it closes (`segment-NNNNNN.h264` beside the checkpoint), never the whole video so far.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch

from gpujob.api import ARTIFACT_PREFIX, JobType
from gpujob.api.params import VideoParams
from gpujob.worker.context import TaskContext
from gpujob.worker.errors import TransientError
from gpujob.worker.task import Task

CODEC = "libx264"
RENDER_SHARE = 95.0


def render_frame(p: VideoParams, index: int, device: torch.device) -> torch.Tensor:
    """One RGB frame [height, width, 3] uint8: smooth escape-time colouring of z -> z² + c, c circling (from a
    point and with a palette the prompt picks: a stand-in generator cannot draw the prompt, but honours it)."""
    t = index / max(p.frames, 1)
    seed = p.prompt_seed()  # the prompt picks where on the circle the clip starts and its palette
    angle = 2 * math.pi * (t + seed)
    c = complex(0.7885 * math.cos(angle), 0.7885 * math.sin(angle))
    zoom = 1.5 * (1 - 0.3 * math.sin(math.pi * t))
    aspect = p.width / p.height
    xs = torch.linspace(-zoom * aspect, zoom * aspect, p.width, device=device)
    ys = torch.linspace(-zoom, zoom, p.height, device=device)
    z = torch.complex(xs[None, :].expand(p.height, -1), ys[:, None].expand(-1, p.width)).clone()
    count = torch.zeros(z.shape, device=device)
    for _ in range(p.max_iter):
        alive = z.abs() <= 4
        z = torch.where(alive, z * z + c, z)
        count += alive
    # Smooth the iteration count so the bands don't flicker between frames.
    smooth = count + 1 - torch.log2(torch.log(z.abs().clamp(min=1.0001)).clamp(min=1e-6) + 1)
    x = (smooth / p.max_iter).clamp(0, 1)[..., None]
    phase = torch.tensor([0.0, 0.33, 0.67], device=device) + t + seed
    rgb = 0.5 + 0.5 * torch.cos(2 * math.pi * (x * 3 + phase))
    return (rgb * 255).to(torch.uint8)


class SegmentEncoder:
    """Frames in, H.264 Annex-B bytes out; `take()` closes the current segment and hands over its bytes."""

    def __init__(self, p: VideoParams) -> None:
        try:
            import av
        except ImportError as exc:
            raise TransientError(
                "PyAV is missing from the worker image: pip install 'gpujob-operator[worker]'"
            ) from exc
        self.av: Any = av
        self.p = p
        self.encoded = bytearray()
        self.codec: Any = None
        self.pts = 0

    def _open(self) -> Any:
        try:
            codec = self.av.CodecContext.create(CODEC, "w")
        except Exception as exc:  # an FFmpeg build without x264
            raise TransientError(f"video encoder {CODEC} is not available in this image: {exc}") from exc
        codec.width, codec.height, codec.pix_fmt = self.p.width, self.p.height, "yuv420p"
        codec.time_base, codec.framerate = Fraction(1, self.p.fps), Fraction(self.p.fps)
        # No B-frames: presentation order = decode order, so the remux can number packets 0, 1, 2, ...
        codec.options = {"preset": "veryfast", "crf": str(self.p.crf), "x264-params": "bframes=0:repeat-headers=1"}
        return codec

    def add(self, frame: torch.Tensor) -> None:
        if self.codec is None:
            self.codec, self.pts = self._open(), 0
        video_frame = self.av.VideoFrame.from_ndarray(frame.cpu().numpy(), format="rgb24").reformat(format="yuv420p")
        video_frame.pts = self.pts
        self.pts += 1
        for packet in self.codec.encode(video_frame):
            self.encoded += bytes(packet)

    def take(self) -> bytes:
        """Close the current segment; its bytes (b"" when no frame went in since the last take)."""
        if self.codec is not None:
            for packet in self.codec.encode(None):
                self.encoded += bytes(packet)
            self.codec = None
        data, self.encoded = bytes(self.encoded), bytearray()
        return data

    def write_mp4(self, path: Path, earlier: Iterable[bytes] = ()) -> int:
        """Remux the `earlier` segments and the current one into one MP4; returns the number of frames."""
        raw = path.with_suffix(".h264")
        with raw.open("wb") as out:
            for segment in earlier:
                out.write(segment)
            out.write(self.take())
        time_base = Fraction(1, self.p.fps)
        count = 0
        with self.av.open(str(raw), format="h264") as src, self.av.open(str(path), "w", format="mp4") as dst:
            stream = dst.add_stream_from_template(src.streams.video[0])
            for packet in src.demux(src.streams.video[0]):
                if packet.size == 0:
                    continue
                packet.stream, packet.time_base = stream, time_base
                packet.pts = packet.dts = count
                packet.duration = 1
                dst.mux(packet)
                count += 1
        raw.unlink()
        return count


class RenderVideo(Task[VideoParams]):
    name = JobType.RENDER_VIDEO.value
    prefix = ARTIFACT_PREFIX[JobType.RENDER_VIDEO]
    params_model = VideoParams

    def run(self, ctx: TaskContext, params: VideoParams) -> dict[str, float]:
        done, segments = 0, 0
        if (state := ctx.load_checkpoint()) is not None:
            done, segments = int(state["step"]), int(state["segments"])
        encoder = SegmentEncoder(params)

        def segment_key(index: int) -> str:
            return ctx.checkpoints.blob_key(f"segment-{index:06d}.h264")

        def checkpoint() -> dict[str, Any]:
            nonlocal segments
            if data := encoder.take():  # only what was encoded since the last checkpoint goes up
                ctx.store.put_bytes(segment_key(segments), data)
                segments += 1
            return {"segments": segments}

        started = time.perf_counter()
        first = done
        with torch.no_grad():
            while done < params.frames:
                encoder.add(render_frame(params, done, ctx.device))
                done += 1
                ctx.report_progress(RENDER_SHARE * done / params.frames, f"Frame {done}/{params.frames}")
                ctx.step_boundary(done, checkpoint)
        seconds = time.perf_counter() - started
        path = ctx.workdir / "video.mp4"
        frames = encoder.write_mp4(path, (ctx.store.get_bytes(segment_key(i)) for i in range(segments)))
        ctx.report_progress(RENDER_SHARE, "uploading video")
        ctx.upload(path, "video.mp4", "video/mp4")
        return {
            "frames": float(frames),
            "renderSeconds": seconds,
            "framesPerSecond": (params.frames - first) / seconds if seconds > 0 else 0.0,
        }
