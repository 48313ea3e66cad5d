"""train_voice: fit a small DDSP-style harmonic vocoder to a synthesized voice, save it and a WAV sample.

The reference stands in for real TTS/voice-cloning training (F5-TTS, GPT-SoVITS): same shape of job: a
model learns from audio for N epochs with checkpoints, and the outputs (weights + a rendered sample) go to
voices/<jobId>/. A team plugs its model in as its own Task (README.md in the worker folder).

The model maps per-frame pitch, loudness and position features to harmonic amplitudes; an additive
synthesizer turns those into a waveform, and a multi-resolution STFT loss compares it with the target.
"""

from __future__ import annotations

import json
import math
import time
import wave
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gpujob.api import ARTIFACT_PREFIX, JobType
from gpujob.api.params import VoiceParams
from gpujob.worker.context import TaskContext
from gpujob.worker.task import Task

FRAME_RATE = 100  # conditioning frames per second
N_POSITION = 4  # sin/cos pairs of the position in the clip (the "text" a real model would get)
TRAIN_SHARE = 95.0


class HarmonicVocoder(nn.Module):
    def __init__(self, harmonics: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(2 + 2 * N_POSITION, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, harmonics + 1),
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """[frames, features] -> harmonic amplitudes [frames, harmonics] (a distribution times a level)."""
        out = self.net(features)
        return F.softplus(out[:, :1]) * torch.softmax(out[:, 1:], dim=-1)


def synthesize(amps: torch.Tensor, f0: torch.Tensor, sample_rate: int, samples: int) -> torch.Tensor:
    """Additive synthesis: frame-rate amplitudes and pitch, upsampled to audio rate, one sine per harmonic."""

    def up(frames: torch.Tensor) -> torch.Tensor:  # [frames, channels] -> [samples, channels]
        return F.interpolate(frames.T[None], size=samples, mode="linear", align_corners=True)[0].T

    f0_audio = up(f0[:, None])[:, 0]
    ks = torch.arange(1, amps.shape[1] + 1, device=amps.device, dtype=amps.dtype)
    amps_audio = up(amps) * (f0_audio[:, None] * ks < sample_rate / 2)  # nothing above Nyquist
    phase = 2 * math.pi * torch.cumsum(f0_audio / sample_rate, dim=0)
    return (amps_audio * torch.sin(phase[:, None] * ks)).sum(dim=1)


def stft_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    loss = pred.new_zeros(())
    for n_fft in (256, 512, 1024):
        window = torch.hann_window(n_fft, device=pred.device)
        spec = [torch.stft(x, n_fft, n_fft // 4, window=window, return_complex=True).abs() for x in (pred, target)]
        loss = loss + F.l1_loss(spec[0], spec[1]) + F.l1_loss(torch.log(spec[0] + 1e-5), torch.log(spec[1] + 1e-5))
    return loss


def make_target(p: VoiceParams, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, f0, waveform) of a synthetic 'voice': vibrato, syllable-like loudness, two vowels morphing."""
    frames = max(2, round(p.seconds * FRAME_RATE))
    t = torch.linspace(0, p.seconds, frames, device=device)
    f0 = p.f0_hz * (1 + 0.04 * torch.sin(2 * math.pi * 5.5 * t) + 0.1 * t / p.seconds)
    loudness = 0.2 + 0.8 * torch.sin(math.pi * 4 * t / max(p.seconds, 1e-3)).abs()
    ks = torch.arange(1, p.harmonics + 1, device=device)
    morph = (0.5 - 0.5 * torch.cos(2 * math.pi * t / p.seconds))[:, None]
    freqs = f0[:, None] * ks

    def vowel(f1: float, f2: float) -> torch.Tensor:
        return torch.exp(-(((freqs - f1) / 120) ** 2)) + 0.6 * torch.exp(-(((freqs - f2) / 200) ** 2)) + 0.02

    envelope = (1 - morph) * vowel(700, 1200) + morph * vowel(300, 2300)
    amps = 0.3 * loudness[:, None] * envelope / envelope.sum(dim=1, keepdim=True)
    wav = synthesize(amps, f0, p.sample_rate, round(p.seconds * p.sample_rate))
    position = [fn(2 * math.pi * (i + 1) * t / p.seconds) for i in range(N_POSITION) for fn in (torch.sin, torch.cos)]
    features = torch.stack([f0 / 500, loudness, *position], dim=1)
    return features, f0, wav


def write_wav(path: Path, wav: torch.Tensor, sample_rate: int) -> None:
    pcm = (wav.detach().cpu().clamp(-1, 1) * 32767).to(torch.int16)
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(pcm.numpy().tobytes())


class TrainVoice(Task[VoiceParams]):
    name = JobType.TRAIN_VOICE.value
    prefix = ARTIFACT_PREFIX[JobType.TRAIN_VOICE]
    params_model = VoiceParams

    def run(self, ctx: TaskContext, params: VoiceParams) -> dict[str, float]:
        from safetensors.torch import save_file

        torch.manual_seed(params.seed)
        features, f0, target = make_target(params, ctx.device)
        model = HarmonicVocoder(params.harmonics, params.hidden).to(ctx.device)
        optimizer = torch.optim.Adam(model.parameters(), lr=params.learning_rate)

        def state_of() -> dict[str, Any]:
            return {"model": model.state_dict(), "optimizer": optimizer.state_dict()}

        step, total = 0, params.epochs * params.steps_per_epoch
        if (state := ctx.load_checkpoint()) is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
        loss, started = math.nan, time.perf_counter()
        while step < total:
            pred = synthesize(model(features), f0, params.sample_rate, target.numel())
            value = stft_loss(pred, target)
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(value)
            optimizer.step()
            step, loss = step + 1, float(value.detach().cpu())
            epoch = (step - 1) // params.steps_per_epoch + 1
            ctx.report_progress(TRAIN_SHARE * step / total, f"Epoch {epoch}/{params.epochs} — loss={loss:.4f}")
            ctx.step_boundary(step, state_of)
        seconds = time.perf_counter() - started
        with torch.no_grad():
            sample = synthesize(model(features), f0, params.sample_rate, target.numel())
        out = ctx.workdir
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps({"architecture": "HarmonicVocoder", **params.wire()}))
        write_wav(out / "sample.wav", sample, params.sample_rate)
        ctx.report_progress(TRAIN_SHARE, "uploading voice model and sample")
        ctx.upload(out / "model.safetensors", "model.safetensors")
        ctx.upload(out / "config.json", "config.json", "application/json")
        ctx.upload(out / "sample.wav", "sample.wav", "audio/wav")
        return {"finalLoss": loss, "steps": float(total), "trainSeconds": seconds}
