"""``segdepth serve``: frames in, per-frame depth results out, at camera rate.

A pipeline of three threads joined by bounded queues, so that throughput is set by the slowest
stage rather than the sum of all: the **receiver** pulls frames (streamer ``Input``) into a
:class:`FrameQueue`; the **inference** stage takes batches (up to ``max_batch`` frames or
``max_wait_ms``), divides each frame by its dose (:mod:`engine.normalise`) and runs the
backend; the **publish** stage turns each prediction into maps, follows the columns of each
session (:mod:`engine.occupancy`) and publishes one result per frame to the recorder (PUSH) and
the viewers (PUB). At most ``pipeline_depth`` predicted batches wait between the last two, so
inference of batch n+1 overlaps post-processing of batch n -- on a GPU, where the two also run
on separate CUDA streams (:func:`engine.device_maps.post_stream`); on the CPU the two take
turns (``overlap``), as the network's threads already take every core and a third busy thread
slowed both. ``eos`` travels the same queues,
so it is forwarded once every frame before it has been answered. Each stage's busy time per
frame is in :meth:`Server.stats` (``stage_ms_per_frame``).

Modes: ``replay`` -- every frame is served and results wait for the recorder (lossless);
``live`` -- the queue holds at most ``queue_frames``, the oldest frames are skipped under
overload (counted in every result's ``skipped``) and results are dropped rather than waited for;
``auto`` -- each frame's own ``mode`` header decides (live when absent).
Malformed messages are counted and skipped (streamer ``Input``); a frame the engine cannot use
(bad pixel size or dose, a shape the model rejects) is counted under ``rejected`` and skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import queue
import threading
import time
from collections import Counter, OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine import backends
from engine.batching import FrameQueue, Item
from engine.columns import ColumnConfig
from engine.device_maps import DevicePrediction, post_stream
from engine.hmm import HMMConfig
from engine.model_io import load
from engine.normalise import DoseNormaliser
from engine.occupancy import Occupancy, SessionAnalysis
from engine.ood import TurnCheck, checked_scores, default_check_every
from engine.prediction import Prediction
from streamer import sockets
from streamer.cli_support import install_stop_signals
from streamer.protocol import FrameLimits, Message, encode, encode_control, make_header
from training.ood_levels import warning_level

log = logging.getLogger(__name__)

SOURCE = "engine"
#: sessions whose column state is kept at once (the oldest is forgotten beyond this).
MAX_SESSIONS = 4
#: column ids of a session's analysis start at (seq of its first frame) x this, so an engine
#: restarted mid-session (or a shape change) never reuses an id of the same session.
COLUMN_ID_STRIDE = 100_000

#: ``ServeConfig.postprocess`` -> the backends' ``device_maps`` argument
POSTPROCESS = {"auto": None, "device": True, "host": False}
OOD_WARN_ON = ("one-pass", "turn")  #: the scores the warning can read (ServeConfig.ood_warn_on)


@dataclass
class ServeConfig:
    """Settings of ``segdepth serve`` (saved as JSON beside its statistics)."""

    frames: str = sockets.FRAMES_TO_ENGINE
    results: str = sockets.RESULTS_TO_RECORDER
    viewer: str | None = sockets.RESULTS_TO_VIEWER
    model: str | None = None
    backend: str = "auto"
    #: largest batch in frames; None: the backend's preferred batch (Backend.preferred_batch:
    #: 1 on the CPU, where batching measured slower, 8 on a GPU)
    max_batch: int | None = None
    max_wait_ms: float = 10.0
    mode: str = "auto"
    queue_frames: int = 0  # 0: 4 x max_batch (4 x 8 when max_batch is the backend's)
    receive_hwm: int = sockets.DEFAULT_HWM  # messages the frame socket may hold, beyond queue
    exit_on_eos: bool = False
    tta: bool = False  # average the 8 flips and quarter turns (8x the inference cost)
    #: a session's frames checked out of distribution by a second, quarter-turned inference
    #: (engine.ood): every this many frames, 0 never (1/N more inference); with tta every frame.
    #: None: engine.ood.default_check_every (off on a CPU backend, which cannot keep up with the
    #: camera, unless the warning reads the turn score)
    ood_check_every: int | None = None
    #: the score the warning reads: "one-pass" (the frame's own, against the model's one-pass
    #: level: it tracks a frame's column errors better, rank correlation 0.67 against the turn
    #: score's 0.54 on the robustness suite at λ = 2.5, and warned on no in-distribution
    #: session frame where the turn score warned on 5 of 64; README "Out-of-distribution
    #: warning") or "turn" (the session's turn score: the median of its last 3 checks)
    ood_warn_on: str = "one-pass"
    #: where maps, column averages and drift are computed: "device" (torch, on the backend's
    #: device; only backends whose outputs are tensors), "host" (numpy), "auto" (the
    #: backend's default: device for torch-cuda and tensorrt, host on the CPU)
    postprocess: str = "auto"
    pipeline_depth: int = 2  # predicted batches waiting for post-processing, at most
    #: inference and post-processing run at the same time (True) or in turn (False). None:
    #: at the same time only when the network runs on a GPU: on the 2-core CPU, where the
    #: network's threads already take both cores, a third busy thread slows them (512^2
    #: through serve, four alternating pairs of runs: BF16 10.7-13.1 frames/s in turns
    #: against 8.1-11.5 at once, FP32 no steady difference; README "Camera rate")
    overlap: bool | None = None
    #: frame shapes (H, W) px to ready the backend for before the first frame is taken (a
    #: compiling backend, torch-cpu-bf16, takes tens of seconds per shape the first time);
    #: otherwise each new shape is readied on its session's first frame, which then waits
    warm: list[tuple[int, int]] = field(default_factory=list)
    #: largest frame side, px, the engine accepts (larger ones are refused and counted before
    #: any allocation) and most pixels in one batch (a larger frame is served alone): together
    #: they bound the engine's memory -- onnxruntime peaks at about 750 bytes per pixel of a
    #: batch (1.0 GB resident for one 1024^2 frame, 3.2 GB for one 2048^2 frame)
    max_frame_px: int = 2048
    max_batch_px: int = 4 * 1024 * 1024
    #: run a reduced-precision backend named explicitly although the model's parity record
    #: refuses it (engine.parity; logged, and reported as ``backend_refusal`` in the stats)
    ignore_parity: bool = False
    columns: ColumnConfig = field(default_factory=ColumnConfig)
    hmm: HMMConfig = field(default_factory=HMMConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", *sockets.MODES):
            raise ValueError(f"mode must be auto, replay or live, got {self.mode!r}")
        if self.postprocess not in POSTPROCESS:
            raise ValueError(
                f"postprocess must be one of {list(POSTPROCESS)}, got {self.postprocess!r}"
            )
        if self.ood_warn_on not in OOD_WARN_ON:
            raise ValueError(f"ood_warn_on must be one of {OOD_WARN_ON}, got {self.ood_warn_on!r}")
        if (
            (self.max_batch is not None and self.max_batch < 1)
            or self.max_wait_ms < 0
            or (self.pipeline_depth < 1)
            or (self.ood_check_every is not None and self.ood_check_every < 0)
        ):
            raise ValueError(
                "max_batch and pipeline_depth must be >= 1, max_wait_ms and ood_check_every >= 0"
            )
        if self.queue_frames <= 0:
            self.queue_frames = 4 * (self.max_batch or 8)


@dataclass
class _Session:
    """A session's state: its dose estimate (inference stage) and column analysis (publish
    stage); a frame carries the state it was prepared with, so a shape change mid-pipeline
    never mixes them."""

    analysis: SessionAnalysis
    dose: DoseNormaliser
    shape: tuple[int, ...]
    turn: TurnCheck


@dataclass
class _Batch:
    """Inference -> publish: a batch's frames, their sessions, doses and prediction
    (``kind`` "frames"); a batch none of whose frames could be used ("rejected": only to be
    acknowledged, in order); or a single eos ("eos")."""

    items: list[Item]
    kind: str = "frames"
    states: list[_Session] = field(default_factory=list)
    frames: list[np.ndarray] = field(default_factory=list)  # normalised by dose
    doses: list[float] = field(default_factory=list)
    estimated: list[bool] = field(default_factory=list)
    pred: Prediction | DevicePrediction | None = None
    turn: np.ndarray | None = None  # (B,) turn scores, NaN for frames not checked
    #: (B,) one-pass scores where they are not the prediction's own (with TTA: the unturned
    #: pass's, which the model's warning levels were measured on)
    uncertainty: np.ndarray | None = None


@dataclass(frozen=True)
class _OOD:
    """A frame's out-of-distribution scores (engine.ood): its uncertainty score, its own turn
    score (NaN: not checked) and its session's turn score (engine.ood.TurnCheck.score, the
    median of its latest checks; NaN: none yet)."""

    uncertainty: float
    turn: float
    session_turn: float


#: the engine's stages as reported in ``stage_ms_per_frame``
STAGES = ("prepare", "infer", "postprocess", "publish")


class Server:
    """The engine process's state: backend, sockets, queue, per-session analysis, counters."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.loaded = load(config.model)
        #: the temporal model; its class prior is the model's unless the config gives one
        self.hmm = (
            config.hmm
            if config.hmm.class_prior is not None
            else replace(config.hmm, class_prior=self.loaded.class_prior)
        )
        self.backend = backends.create(
            config.backend,
            self.loaded,
            max_batch=config.max_batch or 32,
            device_maps=POSTPROCESS[config.postprocess],
            ignore_parity=config.ignore_parity,
        )
        #: why the backend runs although not offered for this model (--ignore-parity), or None
        self.backend_refusal = type(self.backend).refusal(self.loaded)
        self.max_batch = config.max_batch or self.backend.preferred_batch
        self.ood_check_every = (
            default_check_every(self.backend.on_gpu, config.ood_warn_on)
            if config.ood_check_every is None
            else config.ood_check_every
        )
        self.queue = FrameQueue(config.queue_frames)
        self.stop = threading.Event()
        self.sessions: OrderedDict[str, _Session] = OrderedDict()
        # every key exists from the start: the receiver thread never inserts while stats() reads
        self.counts: Counter[str] = Counter(
            dict.fromkeys(
                (
                    "received_frame",
                    "received_eos",
                    "results_sent",
                    "results_dropped",
                    "eos_forwarded",
                ),
                0,
            )
        )
        self.rejected: Counter[str] = Counter()
        self.latencies_ms: deque[float] = deque(maxlen=10_000)  # the latest, for stats
        self._first_receipt: float | None = None  # time.monotonic() of the first frame
        self._last_publish: float | None = None
        # a frame is acknowledged to its source once the recorder acknowledged its result (or
        # it was rejected, or its result was dropped in live mode): a restarted engine gets
        # again every frame whose result a crashed one had not delivered (issue 11)
        self.input = sockets.Input(
            config.frames,
            hwm=config.receive_hwm,
            accept=("frame", "eos", "heartbeat"),
            name="engine frames",
            auto_ack=False,
            limits=FrameLimits(max_side_px=config.max_frame_px),
        )
        self.output = sockets.Output(config.results, mode="replay")
        self.output.stop = self.stop
        self.viewer = sockets.Publisher(config.viewer) if config.viewer else None
        self._predicted: queue.Queue[_Batch] = queue.Queue(config.pipeline_depth)
        self.overlap = self.backend.on_gpu if config.overlap is None else config.overlap
        #: held by inference and by post-processing with publishing when they take turns
        self._turns: AbstractContextManager[Any] = (
            contextlib.nullcontext() if self.overlap else threading.Lock()
        )
        #: (results-link seq to be acknowledged first, source message): the publish stage
        #: acknowledges each message to its source once its reader has what came before
        self._unsettled: deque[tuple[int, Message]] = deque()
        #: busy seconds and frames of each stage (STAGES), for stage_ms_per_frame, and the
        #: latest batches' ms per frame, for its median (session start-up, when the column
        #: reference grows, weighs on the mean only)
        self.stage_s: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self.stage_frames: dict[str, int] = dict.fromkeys(STAGES, 0)
        self.stage_recent_ms: dict[str, deque[float]] = {k: deque(maxlen=1000) for k in STAGES}
        # stages write these (and latencies_ms, rejected); stats() reads them
        self._stage_lock = threading.Lock()
        self._receiver = threading.Thread(target=self._receive, name="receiver", daemon=True)
        self._publisher = threading.Thread(target=self._publish_loop, name="publish", daemon=True)
        #: reduces a host prediction's maps while the publish stage tracks its columns (with
        #: inference and post-processing in turn, the second core is otherwise idle then)
        self._maps_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="maps")
        #: the CUDA stream of post-processing on the device, beside the inference's own
        #: (:func:`engine.device_maps.post_stream`); None where the maps stay on the host
        on_cuda = self.backend.on_gpu and self.backend.device_maps and torch.cuda.is_available()
        self._post_stream = torch.cuda.Stream() if on_cuda else None

    # -- receiving ---------------------------------------------------------------------------
    def _is_live(self, msg: Message) -> bool:
        if self.config.mode != "auto":
            return self.config.mode == "live"
        return msg.header.get("mode", "live") != "replay"

    def _receive(self) -> None:
        while not self.stop.is_set():
            msg = self.input.recv(timeout_s=0.1)
            if msg is None or msg.kind == "heartbeat":
                continue
            now = time.monotonic()
            if msg.kind == "frame":
                if self._first_receipt is None:
                    self._first_receipt = now
                item = Item(msg, (msg.header["session"], msg.arrays["frame"].shape), now)
            else:
                item = Item(msg, (msg.header["session"],), now, is_frame=False)
            self.counts["received_" + msg.kind] += 1  # kinds: frame, eos (heartbeats skipped)
            if not self.queue.put(item, live=self._is_live(msg)):
                return

    # -- inference ---------------------------------------------------------------------------
    def _warm(self, shape: tuple[int, ...]) -> None:
        """Ready the backend for a new session's frame shape (CUDA graphs for every batch), so
        that no capture stalls the session later; a failure is left to inference to report."""
        try:
            self.backend.warm((int(shape[0]), int(shape[1])))
        except (RuntimeError, ValueError) as exc:
            log.warning("backend warm-up for %s failed: %s: %s", shape, type(exc).__name__, exc)

    def _session(self, msg: Message) -> _Session:
        name, shape = msg.header["session"], msg.arrays["frame"].shape
        state = self.sessions.get(name)
        if state is None or state.shape != shape:
            if state is not None:
                log.warning(
                    "session %s changed frame shape %s -> %s: columns restart",
                    name,
                    state.shape,
                    shape,
                )
            state = _Session(
                SessionAnalysis(
                    float(msg.header["pixel_size_pm"]),
                    self.config.columns,
                    self.hmm,
                    first_id=msg.seq * COLUMN_ID_STRIDE,
                ),
                DoseNormaliser(),
                shape,
                TurnCheck(self.ood_check_every),
            )
            self.sessions[name] = state
            self._warm(shape)
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        self.sessions.move_to_end(name)
        return state

    def _reject(self, reason: str, detail: str) -> None:
        if self.rejected[reason] == 0:
            log.warning(
                "skipped a frame the engine cannot use (%s: %s); further ones are counted silently",
                reason,
                detail,
            )
        with self._stage_lock:  # stats() copies the counter from another thread
            self.rejected[reason] += 1

    def _clock(self, stage: str, since: float, frames: int) -> float:
        now = time.perf_counter()
        with self._stage_lock:
            self.stage_s[stage] += now - since
            self.stage_frames[stage] += frames
            if frames:
                self.stage_recent_ms[stage].append(1e3 * (now - since) / frames)
        return now

    def _prepare(self, items: list[Item]) -> _Batch:
        batch = _Batch([])
        for item in items:
            head = item.payload.header
            pixel = head["pixel_size_pm"]
            if not (math.isfinite(pixel) and pixel > 0):
                self._reject("pixel_size", f"pixel_size_pm = {pixel!r}")
                continue
            state = self._session(item.payload)
            try:
                x, dose, was_estimated = state.dose.normalise(
                    item.payload.arrays["frame"], head.get("dose_e_per_px")
                )
            except ValueError as exc:
                self._reject("dose", str(exc))
                continue
            batch.items.append(item)
            batch.states.append(state)
            batch.doses.append(dose)
            batch.estimated.append(was_estimated)
            batch.frames.append(x)
        return batch

    def _infer(self, items: list[Item]) -> _Batch:
        """Inference stage: the prepared batch with its prediction (or marked rejected)."""
        t = time.perf_counter()
        batch = self._prepare(items)
        t = self._clock("prepare", t, len(items))
        if not batch.items:
            return _Batch(items, kind="rejected")
        with self._turns:
            t = time.perf_counter()  # a wait for post-processing's turn is not inference
            try:
                frames = np.stack(batch.frames)
                if self.config.tta:
                    batch.pred, batch.turn, batch.uncertainty = backends.infer_tta(
                        self.backend, frames
                    )
                else:
                    batch.pred = self.backend.infer(frames)
            except (RuntimeError, ValueError) as exc:  # e.g. a frame size the model cannot take
                for _ in batch.items:
                    self._reject("inference", f"{type(exc).__name__}: {exc}")
                return _Batch(items, kind="rejected")
            if batch.turn is None:
                batch.turn = self._turn_checks(batch, frames)
        self._clock("infer", t, len(batch.items))
        return batch

    def _turn_checks(self, batch: _Batch, frames: np.ndarray) -> np.ndarray:
        """Turn scores (B,) of the batch's frames due for a check (engine.ood), NaN for the
        others and for a check the backend could not run (counted: ``ood_check_failed``)."""
        scores = np.full(len(batch.items), np.nan)
        due = [
            i
            for i, (item, state) in enumerate(zip(batch.items, batch.states))
            if state.turn.due(item.payload.seq)
        ]
        if due:
            assert batch.pred is not None
            try:
                scores[due] = checked_scores(self.backend.infer, frames, batch.pred, due)
            except (RuntimeError, ValueError) as exc:  # e.g. a plan fixed to H x W, H != W
                self.counts["ood_check_failed"] += len(due)
                log.warning("turn check failed: %s: %s", type(exc).__name__, exc)
        return scores

    def _handoff(self, batch: _Batch) -> None:
        """Queue a batch for the publish stage (waits while it is ``pipeline_depth`` behind;
        dropped when the engine stops first)."""
        while not self.stop.is_set():
            try:
                self._predicted.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue

    def _publish_loop(self) -> None:
        """Publish stage: results of predicted batches, eos forwarded, frames acknowledged to
        their source -- all in arrival order, so an acknowledgement never overtakes a result
        still to be published."""
        while True:
            try:
                batch = self._predicted.get(timeout=0.1)
            except queue.Empty:
                self._settle()
                if self.stop.is_set():
                    return
                continue
            if batch.kind == "rejected":  # done with them once earlier results are delivered
                self._settle_after(self.output.last_sent, batch.items[-1].payload)
                continue
            if batch.kind == "eos":
                self._forward_eos(batch.items[0].payload)
                if self.config.exit_on_eos:
                    self.stop.set()
                    return
                continue
            self._serve_batch(batch)

    def _serve_batch(self, batch: _Batch) -> None:
        with self._turns:
            self._post_and_publish(batch)

    def _post_and_publish(self, batch: _Batch) -> None:
        t = time.perf_counter()
        n = len(batch.items)
        pred = batch.pred
        assert pred is not None  # only "frames" batches reach here (_publish_loop)
        maps = self._maps_worker.submit(pred.maps) if isinstance(pred, Prediction) else None
        turn = batch.turn
        assert turn is not None  # set by the inference stage with the prediction
        for i in range(n):
            if math.isfinite(turn[i]):
                batch.states[i].turn.record(float(turn[i]))
        # one session's frames (engine.batching keys a batch by session and shape), tracked
        # together: on the inference device two waits for the lot, not two per frame
        analysis = batch.states[0].analysis
        assert all(state.analysis is analysis for state in batch.states)
        with post_stream(pred, self._post_stream):
            occupancy = analysis.update_series(
                [pred.frame(i) for i in range(n)],
                [item.payload.seq for item in batch.items],
                [item.payload.header.get("t_acq") for item in batch.items],
            )
            depth, confidence, species = maps.result() if maps is not None else pred.maps()
            ood = pred.uncertainty_scores() if batch.uncertainty is None else batch.uncertainty
        results = [
            (
                occ,
                {
                    "depth": depth[i],
                    "confidence": confidence[i],
                    "species": species[i],
                    **occ.buffers(),
                },
            )
            for i, occ in enumerate(occupancy)
        ]
        t = self._clock("postprocess", t, n)
        for i, (item, (occ, arrays)) in enumerate(zip(batch.items, results)):
            scores = _OOD(float(ood[i]), float(turn[i]), batch.states[i].turn.score)
            self._publish(item, occ, arrays, batch.doses[i], batch.estimated[i], n, scores)
        self._clock("publish", t, n)

    def _publish(
        self,
        item: Item,
        occ: Occupancy,
        arrays: dict[str, np.ndarray],
        dose: float,
        dose_estimated: bool,
        batch_size: int,
        ood: _OOD,
    ) -> None:
        msg = item.payload
        head = msg.header
        latency_ms = (time.monotonic() - item.t_recv) * 1e3
        result = make_header(
            "result",
            session=head["session"],
            seq=msg.seq,
            source=SOURCE,
            t_acq=head["t_acq"],
            model_id=self.loaded.model_id,
            backend=self.backend.name,
            batch_size=batch_size,
            latency_ms=latency_ms,
            frame_seq=msg.seq,
            skipped=self.queue.skipped,
            pixel_size_pm=float(head["pixel_size_pm"]),
            dose_e_per_px=float(dose),
            dose_estimated=dose_estimated,
            drift_px=list(occ.columns.drift_px),
            columns=occ.table(),
            events=[e.as_dict() for e in occ.events],
            ood_score=ood.uncertainty,
            ood_turn_score=ood.turn if math.isfinite(ood.turn) else None,
            ood_warning=self._ood_warning(ood, dose),
            mode="live" if self._is_live(msg) else "replay",
        )
        parts = encode(result, arrays)
        if self.output.send(parts, wait=not self._is_live(msg)):
            self.counts["results_sent"] += 1
        else:
            self.counts["results_dropped"] += 1
        # live mode loses frames under load by design: its frames are done with at once
        self._settle_after(-1 if self._is_live(msg) else self.output.last_sent, msg)
        if self.viewer is not None:
            self.viewer.send(parts)
        with self._stage_lock:
            self.latencies_ms.append(latency_ms)
        self._last_publish = time.monotonic()

    def _settle_after(self, link_seq: int, msg: Message) -> None:
        """Acknowledge ``msg`` to its source once the results link's reader acknowledged
        everything up to ``link_seq`` (at once when it has)."""
        self._unsettled.append((link_seq, msg))
        self._settle()

    def _settle(self) -> None:
        """Acknowledge to the source what the results link's reader has made safe."""
        self.output.service()
        safe, last = self.output.acknowledged_upto, None
        while self._unsettled and self._unsettled[0][0] <= safe:
            last = self._unsettled.popleft()[1]
        if last is not None:
            self.input.ack(upto=last)

    def _ood_warning(self, ood: _OOD, dose: float) -> bool | None:
        """Whether the frame lies outside what the model knows (training.ood_levels
        .warning_level, at this dose): with ``ood_warn_on`` "turn", the session's turn score
        (the median of its latest checks) against the model's turn level where both exist;
        otherwise, and always with "one-pass", the frame's one-pass score against the one-pass
        level; None when the model has no level for the score at hand."""
        if self.config.ood_warn_on == "turn" and math.isfinite(ood.session_turn):
            turn_level = warning_level(self.loaded.meta, "turn", dose)
            if turn_level is not None:
                return bool(ood.session_turn > turn_level)
        level = warning_level(self.loaded.meta, "one_pass", dose)
        return None if level is None else bool(ood.uncertainty > level)

    def _forward_eos(self, msg: Message) -> None:
        head = msg.header
        parts = encode_control(
            "eos",
            session=head["session"],
            seq=msg.seq,
            source=SOURCE,
            frames_processed=self.counts["results_sent"],
            skipped=self.queue.skipped,
        )
        sent = self.output.send(parts, timeout_s=10.0, wait=True)
        # the source's eos is done with once every result before it is safe: a recorder stops
        # at the source's eos with all results in, and may never read the engine's own eos
        self._settle_after(self.output.last_sent - 1 if sent else self.output.last_sent, msg)
        if self.viewer is not None:
            self.viewer.send(parts)
        self.counts["eos_forwarded"] += 1
        log.info(
            "end of stream of session %s forwarded (%d results so far, %d skipped)",
            head["session"],
            self.counts["results_sent"],
            self.queue.skipped,
        )

    def run(self) -> int:
        """Serve until stopped (signal, ``stop``), or after the first eos with exit_on_eos."""
        log.info(
            "serving model %s with backend %s (batch <= %d, wait <= %.1f ms, mode %s): "
            "frames from %s, results to %s, viewers on %s",
            self.loaded.model_id,
            self.backend.name,
            self.max_batch,
            self.config.max_wait_ms,
            self.config.mode,
            self.config.frames,
            self.config.results,
            self.config.viewer,
        )
        for shape in self.config.warm:
            log.info("readying backend %s for %s frames", self.backend.name, shape)
            self._warm(shape)
        self._receiver.start()
        self._publisher.start()
        max_wait_s = self.config.max_wait_ms / 1e3
        last_log = time.monotonic()
        while not self.stop.is_set():
            items = self.queue.take_batch(
                self.max_batch, max_wait_s, max_pixels=self.config.max_batch_px
            )
            if items and items[0].is_frame:
                self._handoff(self._infer(items))
            elif items:
                self._handoff(_Batch(items, kind="eos"))  # in order behind earlier frames
            if time.monotonic() - last_log > 10.0:
                last_log = time.monotonic()
                log.info("%s", self.stats())
        self._publisher.join()
        return 0

    def stats(self) -> dict[str, Any]:
        with self._stage_lock:  # a snapshot: the stages go on writing
            lat = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
            stage_ms = {
                k: 1e3 * self.stage_s[k] / self.stage_frames[k] if self.stage_frames[k] else None
                for k in STAGES
            }
            stage_p50 = {
                k: float(np.median(v)) if v else None for k, v in self.stage_recent_ms.items()
            }
            rejected = dict(self.rejected)
        busy_s = (
            self._last_publish - self._first_receipt
            if self._first_receipt is not None and self._last_publish is not None
            else 0.0
        )
        return {
            **dict(self.counts),
            "skipped": self.queue.skipped,
            "busy_s": busy_s,
            "throughput_frames_per_s": self.counts["results_sent"] / busy_s if busy_s > 0 else None,
            "rejected": rejected,
            "input": self.input.stats(),
            "latency_ms_p50": float(np.percentile(lat, 50)),
            "latency_ms_p99": float(np.percentile(lat, 99)),
            "stage_ms_per_frame": stage_ms,
            "stage_ms_per_frame_p50": stage_p50,
            "backend": self.backend.name,
            "backend_refusal": self.backend_refusal,
            "postprocess": "device" if self.backend.device_maps else "host",
            "max_batch": self.max_batch,
            "overlap": self.overlap,
            "ood_check_every": self.ood_check_every,
            "tta": self.config.tta,
            "model_id": self.loaded.model_id,
        }

    def close(self) -> None:
        self.stop.set()
        self.queue.close()
        self._receiver.join(timeout=2.0)
        if self._publisher.is_alive():
            self._publisher.join(timeout=10.0)
        self._maps_worker.shutdown(wait=False)
        self.output.flush(self.output.linger_s)  # the results' reader acknowledges the rest
        self._settle()  # ... and the source learns which frames are done with
        self.input.close()
        self.output.close(0)  # (waited for above)
        if self.viewer is not None:
            self.viewer.close()


def serve(config: ServeConfig, stats_path: Path | None = None) -> int:
    """Run a server until SIGINT/SIGTERM (or eos with ``exit_on_eos``); write stats JSON."""
    server = Server(config)
    install_stop_signals(server.stop, lambda signum: log.info("signal %d: stopping", signum))
    try:
        code = server.run()
    finally:
        server.close()
        stats = server.stats()
        log.info("engine stopped: %s", stats)
        if stats_path is not None:
            stats_path.parent.mkdir(parents=True, exist_ok=True)
            stats_path.write_text(
                json.dumps({"config": asdict(config), "stats": stats}, indent=2, default=str)
            )
    return code
