"""The training loop: jitted data-parallel steps, per-epoch evaluation, gate reports, metrics,
checkpoints and a final ``summary.json``.

A run is a function of its config: restarted with the same working directory it resumes from
its last checkpoint and ends exactly where an uninterrupted run ends (the minibatch order of an
epoch is a pure function of the seed and the epoch, a step's gate noise of the seed and the step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sparsejax.data.sources import BatchSource, open_source
from sparsejax.errors import ConfigError, UserError
from sparsejax.methods.base import Method, MethodState, RunInfo
from sparsejax.methods.budget import requested_target, target_report
from sparsejax.models.base import GatedModel
from sparsejax.structure.report import GateReport, sparsity_report
from sparsejax.structure.traced_model import build_any_model
from sparsejax.train.checkpoint import BEST_METRIC, CHECKPOINT_DIR, Checkpointer
from sparsejax.train.compile_cache import avoid_hanging_cache
from sparsejax.train.config import CONFIG_FORMAT, FORMAT_KEY, resolve_config
from sparsejax.train.dispatch import dispatch_counts, model_steps_per_dispatch
from sparsejax.train.input import DEFAULT_THREADS, Input
from sparsejax.train.lock import WorkdirLock
from sparsejax.train.metrics import METRICS_FILE, MetricWriter, NullWriter
from sparsejax.train.phases import PHASE_STARTS, PhasePlan
from sparsejax.train.preemption import Preempted, StopRequest
from sparsejax.train.pretrained import load_network_weights
from sparsejax.train.progress import Progress
from sparsejax.train.sharding import (
    create_mesh,
    global_batch,
    global_block,
    local_copy,
    place_like_params,
    place_state,
)
from sparsejax.train.state import TrainState, evaluated_params, init_state, merge_model
from sparsejax.train.step import LEARNING_RATE, make_eval_step, make_train_step

CONFIG_FILE = "config.json"
SUMMARY_FILE = "summary.json"
RESUMABLE_CHANGES = (
    "epochs", "fine_tune_epochs", "data_dir", "keep_checkpoints", "fsdp", "steps_per_dispatch"
)
"""Config fields that may differ when a run is resumed (``fsdp``: onto another mesh shape)."""


class NonFiniteLossError(UserError, FloatingPointError):
    """The training loss became NaN or infinite."""


class DamagedConfigError(UserError, ValueError):
    """A run directory's ``config.json`` is not a JSON object."""


def read_saved_config(path: Path) -> dict:
    """The config a run saved in ``path`` (its ``config.json``).

    Raises:
      DamagedConfigError: naming the file, if it is not a JSON object.
    """
    try:
        saved = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = f"not JSON: {error}"
    else:
        if isinstance(saved, dict):
            return saved
        reason = f"a JSON {type(saved).__name__}, not an object"
    raise DamagedConfigError(
        f"{path} is damaged ({reason}); fix or delete it, or use another --workdir"
    )


class OutdatedRunError(UserError, ValueError):
    """A run directory written by an earlier sparsejax, whose layout this one cannot read."""


def check_format(path: Path, saved: dict) -> dict:
    """``saved`` (the ``config.json`` at ``path``) without its format key.

    Raises:
      OutdatedRunError: when it was written before :data:`CONFIG_FORMAT`.
    """
    saved = dict(saved)
    if saved.pop(FORMAT_KEY, None) != CONFIG_FORMAT:
        raise OutdatedRunError(
            f"{path.parent} holds a run written by an earlier sparsejax, whose checkpoints "
            "(method state, parameter average, optimizer state, phases) this version cannot "
            "resume or read: train it again in a new --workdir (or read it with the sparsejax "
            "that wrote it)"
        )
    return saved


def _check_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    path = workdir / CONFIG_FILE
    current = json.loads(config.to_json_best_effort())
    if path.exists():
        saved = check_format(path, read_saved_config(path))
        changed = sorted(
            key
            for key in set(saved) | set(current)
            if key not in RESUMABLE_CHANGES and saved.get(key) != current.get(key)
        )
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in changed)
            raise ConfigError(
                f"{workdir} holds a run with a different configuration ({details}); "
                "use another --workdir, or the same flags to resume it"
            )


def _write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    if jax.process_index() == 0:
        current = {**json.loads(config.to_json_best_effort()), FORMAT_KEY: CONFIG_FORMAT}
        _write_atomically(workdir / CONFIG_FILE, json.dumps(current, indent=2, sort_keys=True) + "\n")


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_suffix(path.suffix + ".partial")
    try:
        partial.write_text(text)
    except OSError as error:  # a failed write (e.g. disk full) names no file; name it
        raise OSError(error.errno, error.strerror, str(partial)) from error
    partial.replace(path)


def evaluated_model(graphdef: nnx.GraphDef, state: TrainState, ema_decay: float) -> GatedModel:
    """A host-side model of the network a run evaluates, reports and slims: the parameters, or
    their average when ``ema_decay`` is not 0 (:func:`~sparsejax.train.state.evaluated_params`),
    with the BatchNorm statistics of the trained (raw) model."""
    state = local_copy(state)
    return merge_model(graphdef, evaluated_params(state, ema_decay), state.model_state)


def _step_of(state: TrainState) -> int:
    return int(local_copy(state.step))


def load_data(config: ml_collections.ConfigDict) -> BatchSource:
    """The dataset of a run."""
    return open_source(
        config.dataset,
        data_dir=config.get("data_dir"),
        seed=config.seed,
        synthetic_like=config.get("synthetic_like", "fashion_mnist"),
        num_train=config.get("num_train"),
        num_test=config.get("num_test"),
        augment=config.get("augment", "none"),
        normalize_channels=config.get("normalize", False),
    )


def build(
    config: ml_collections.ConfigDict, data: BatchSource
) -> tuple[Method, GatedModel, MethodState]:
    """The method, its model with the initial weights of ``config.seed`` (or the network
    weights of the method's :meth:`~Method.pretrained_run`) and the method's initial state."""
    method_cls, config = resolve_config(config)
    run = RunInfo(data.num_train, steps_per_epoch_of(config, data), config.get("epochs"))
    method = method_cls(config, run)
    options = method.model_options() | {
        "use_placements": method.uses_gate_placements, "input_dtype": data.input_dtype}
    model = build_any_model(
        config.model,
        rngs=nnx.Rngs(params=config.seed),
        num_classes=data.num_classes,
        input_shape=data.image_shape,
        gate_factory=method.make_gates,
        granularity=config.granularity,
        **options,
    )
    if pretrained := method.pretrained_run():
        load_network_weights(model, pretrained)
    return method, model, method.init(model)


def _report_record(report: GateReport) -> dict:
    return {
        "sparsity/active_units": report.active_units,
        "sparsity/expected_l0": report.expected_l0,
        "sparsity/expected_flops": report.expected_flops,
        "sparsity/params": report.params,
        "sparsity/flops": report.flops,
        "sparsity/pruning_rate": report.pruning_rate,
    }


def steps_per_epoch_of(config: ml_collections.ConfigDict, data: BatchSource) -> int:
    """Training steps per epoch: full batches of the training set, at most ``steps_per_epoch``."""
    if config.batch_size > data.num_train:
        raise ConfigError(
            f"batch_size {config.batch_size} exceeds the {data.num_train} training examples; "
            "use a smaller --batch_size"
        )
    steps = data.num_train // config.batch_size
    return min(steps, config.steps_per_epoch) if config.get("steps_per_epoch") else steps


def evaluate(eval_step, state: TrainState, inputs: Input) -> dict[str, float]:
    """Test error (percent) and mean loss of ``state`` over the whole test set."""
    totals = [eval_step(state, *batch) for batch in inputs.eval_batches()]
    wrong, loss = (sum(float(t[k]) for t in jax.device_get(local_copy(totals))) for k in (0, 1))
    count = inputs.num_test
    return {"err": 100.0 * wrong / count, "loss": loss / count}


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a run of a config is made of before any training: its mesh, data, method, phases,
    model structure, initial train state (placed on the mesh:
    :func:`~sparsejax.train.sharding.place_state`) and input pipeline."""

    config: ml_collections.ConfigDict
    mesh: Mesh
    data: BatchSource
    method: Method
    plan: PhasePlan
    graphdef: nnx.GraphDef
    initial_state: TrainState
    inputs: Input
    notes: tuple[str, ...] = ()
    """What the model keeps whole and why (:meth:`GatedModel.notes`), shown as a run starts."""
    steps_per_dispatch: int = 1
    """Training steps run by one dispatch of the jitted program (:mod:`.dispatch`)."""
    _phase_steps: dict[tuple[int, bool], Callable] = dataclasses.field(default_factory=dict)

    @property
    def steps_per_epoch(self) -> int:
        return self.inputs.steps_per_epoch

    def train_step(self, phase: int, stacked: bool = False) -> Callable:
        """The jitted step of phase ``phase`` (its method and optimizer), built once; with
        ``stacked``, the program that runs one step per batch of a stacked block
        (:func:`~sparsejax.train.step.make_train_step`)."""
        if (phase, stacked) not in self._phase_steps:
            self._phase_steps[phase, stacked] = make_train_step(
                self.graphdef,
                self.plan.phases[phase].method,
                self.plan.optimizer(phase),
                self.mesh,
                self.config.ema_decay,
                stacked=stacked,
            )
        return self._phase_steps[phase, stacked]

    def with_fresh_optimizer(self, state: TrainState, phase: int) -> TrainState:
        """``state`` with the optimizer state of phase ``phase`` initialised from its
        parameters (the state a phase with its own optimizer begins with)."""
        opt_state = self.plan.optimizer(phase).init(state.params)
        return state.replace(opt_state=place_like_params(opt_state, self.mesh))

    def state_template(self, progress: dict) -> TrainState:
        """A train state shaped like a checkpoint whose progress record is ``progress``
        (:meth:`PhasePlan.state_template`), placed like the run's states."""
        return place_state(self.plan.state_template(self.initial_state, progress), self.mesh)

    def advance(
        self, state: TrainState, progress: dict, announce: Callable[[str], None]
    ) -> tuple[int | None, TrainState, dict]:
        """The phase that trains the next epoch (None: the run is over), beginning the phases
        whose time has come at epoch ``progress["epoch"]``: each is recorded in ``progress``
        and, with its own optimizer, starts from a fresh optimizer state."""
        while True:
            starts = progress[PHASE_STARTS]
            phase = len(starts) - 1
            method_state = functools.cache(lambda: local_copy(state.method_state))
            if not self.plan.ended(phase, starts[-1], progress["epoch"], method_state):
                return phase, state, progress
            finished = self.plan.phases[phase]
            if finished.until is not None and not finished.until(method_state()):
                announce(
                    f"the {finished.name} phase reached its longest planned length "
                    f"({finished.epochs} epochs) before the method ended it"
                )
            if phase + 1 == len(self.plan.phases):
                return None, state, progress
            progress = {**progress, PHASE_STARTS: [*starts, progress["epoch"]]}
            if self.plan.starts_optimizer(phase + 1):
                state = self.with_fresh_optimizer(state, phase + 1)
            upcoming = self.plan.phases[phase + 1]
            if upcoming.epochs:
                announce(f"epoch {progress['epoch'] + 1}: the {upcoming.name} phase begins")


def set_up(config: ml_collections.ConfigDict) -> RunSetup:
    """Build everything a run of ``config`` needs, over every device."""
    resolve_config(config)  # refuse unknown fields before any data is read
    mesh = create_mesh(config.get("fsdp", 1))
    data = load_data(config)
    method, model, method_state = build(config, data)
    config = method.config
    steps_per_epoch = method.run.steps_per_epoch
    plan = PhasePlan(method.phases(), steps_per_epoch)
    root_key = jax.random.key(config.seed)
    graphdef, state = init_state(
        model, method_state, plan.optimizer(0), jax.random.fold_in(root_key, 0), config.ema_decay
    )
    inputs = Input(
        data,
        mesh,
        batch_size=config.batch_size,
        eval_batch_size=config.eval_batch_size,
        steps_per_epoch=steps_per_epoch,
        seed=config.seed,
        workers=config.get("input_workers", 0),
        threads=config.get("input_threads", DEFAULT_THREADS),
    )
    example = jax.ShapeDtypeStruct((config.batch_size, *data.image_shape), data.input_dtype)
    steps_per_dispatch = model_steps_per_dispatch(config.steps_per_dispatch, model, example)
    return RunSetup(
        config, mesh, data, method, plan, graphdef, place_state(state, mesh), inputs,
        model.notes(), steps_per_dispatch,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Train ``config.model`` with ``config.method`` on ``config.dataset`` over every device;
    return the summary (also written to ``workdir/summary.json``).

    The run holds ``workdir`` (:class:`~sparsejax.train.lock.WorkdirLock`) while it writes it. A
    run that fails before it saved anything leaves no working directory behind when it created
    it. Raises :class:`~sparsejax.train.preemption.Preempted` after saving a checkpoint when the
    process receives SIGTERM or SIGINT (or a multi-host preemption notice). On jax 0.12 and
    later, a run of several CPU processes does not use JAX's persistent compilation cache
    (:func:`~sparsejax.train.compile_cache.avoid_hanging_cache`)."""
    avoid_hanging_cache()
    workdir = Path(workdir)
    created = not workdir.exists()
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
            return _train_and_evaluate(config, workdir)
    except BaseException:
        if created and jax.process_index() == 0:
            _remove_if_unused(workdir)
        raise


def _remove_if_unused(workdir: Path) -> None:
    """Delete ``workdir`` when it holds no checkpoint and no metric record."""
    checkpoints = workdir / CHECKPOINT_DIR
    metrics = workdir / METRICS_FILE
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        return
    if metrics.exists() and metrics.stat().st_size:
        return
    shutil.rmtree(workdir, ignore_errors=True)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: Path) -> dict:
    setup = set_up(config)
    config = setup.config
    _check_config(workdir, config)
    graphdef, inputs, state = setup.graphdef, setup.inputs, setup.initial_state
    steps_per_epoch = setup.steps_per_epoch
    eval_step = make_eval_step(graphdef, config.ema_decay)

    plan = setup.plan
    progress_record = {"epoch": 0, "test_errors": [], "epoch_seconds": [], PHASE_STARTS: [0]}
    with contextlib.closing(
        Checkpointer(workdir, max_to_keep=config.keep_checkpoints, set_aside=True)
    ) as checkpointer:
        restored = checkpointer.restore(setup.state_template)
        if restored is not None:
            state, progress_record = restored
        if config.epochs is not None and progress_record["epoch"] > config.epochs:
            raise ConfigError(
                f"{workdir} holds a run that has finished {progress_record['epoch']} epochs, "
                f"more than --epochs={config.epochs}; pass --epochs={progress_record['epoch']} "
                "(or more, to train on) to resume it, or use another --workdir"
            )
        _write_config(workdir, config)
        start_step = _step_of(state)

        writer = (
            MetricWriter(workdir, resume_step=start_step)
            if jax.process_index() == 0
            else NullWriter()
        )
        planned = plan.planned_epochs(progress_record[PHASE_STARTS])
        progress = Progress(planned * steps_per_epoch, initial=start_step)
        if not start_step:
            for note in setup.notes:
                progress.message(note)
        if len(plan.phases) > 1:
            progress.message(plan.describe())
        if start_step:
            progress.message(f"resuming {workdir} at step {start_step}")
        try:
            with StopRequest() as stop:
                batches = iter(inputs.dataset(start_step, planned * steps_per_epoch))
                run = _Run(
                    config, inputs, batches, setup.train_step, setup.steps_per_dispatch,
                    eval_step, graphdef, checkpointer, writer, progress, stop,
                )
                while True:
                    phase, state, progress_record = setup.advance(
                        state, progress_record, progress.message
                    )
                    if phase is None:
                        break
                    progress.set_total(
                        plan.planned_epochs(progress_record[PHASE_STARTS]) * steps_per_epoch
                    )
                    state, progress_record = run.epoch(phase, state, progress_record)
        except BaseException:
            progress.close()
            writer.abandon()
            raise
        progress.close()
        writer.close()

    final_model = evaluated_model(graphdef, state, config.ema_decay)
    report = sparsity_report(final_model)
    summary = _summary(config, setup.data, report, progress_record, steps_per_epoch)
    summary.update(target_report(requested_target(config), report))
    if len(plan.phases) > 1:
        summary["phases"] = plan.summary(progress_record[PHASE_STARTS], progress_record["epoch"])
    summary.update(setup.method.report(final_model, local_copy(state.method_state)))
    if jax.process_index() == 0:
        _write_atomically(workdir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary


@dataclasses.dataclass
class _Run:
    """The fixed parts of a run that every epoch uses."""

    config: ml_collections.ConfigDict
    inputs: Input
    batches: Iterator[tuple[np.ndarray, np.ndarray]]
    """This process's parts of the training batches, in step order (:meth:`Input.dataset`)."""
    train_step: Callable[[int, bool], Callable]
    """The jitted step of a phase, by phase index (stacked or not: :meth:`RunSetup.train_step`)."""
    steps_per_dispatch: int
    eval_step: Callable
    graphdef: nnx.GraphDef
    checkpointer: Checkpointer
    writer: MetricWriter | NullWriter
    progress: Progress
    stop: StopRequest

    def epoch(self, phase: int, state: TrainState, progress_record: dict):
        """One epoch of phase ``phase`` (or its remainder after a resume), its evaluation and
        its checkpoint."""
        steps_per_epoch = self.inputs.steps_per_epoch
        epoch = progress_record["epoch"]
        started = time.perf_counter()
        first = _step_of(state) - epoch * steps_per_epoch
        for chunk_start in range(first, steps_per_epoch, self.config.log_every):
            chunk_end = min(chunk_start + self.config.log_every, steps_per_epoch)
            state = self._chunk(epoch, phase, state, chunk_start, chunk_end, progress_record)
        epoch_seconds = time.perf_counter() - started

        evaluation = evaluate(self.eval_step, state, self.inputs)
        report = sparsity_report(evaluated_model(self.graphdef, state, self.config.ema_decay))
        progress_record = {
            **progress_record,
            "epoch": epoch + 1,
            "test_errors": [*progress_record["test_errors"], evaluation["err"]],
            "epoch_seconds": [*progress_record["epoch_seconds"], epoch_seconds],
        }
        step = (epoch + 1) * steps_per_epoch
        self.writer.write(
            step,
            {
                "epoch": epoch + 1,
                BEST_METRIC: evaluation["err"],
                "eval/loss": evaluation["loss"],
                "epoch_seconds": epoch_seconds,
                **_report_record(report),
            },
        )
        self.writer.histograms(step, {f"gates/{k}": v for k, v in report.test_gates.items()})
        self.progress.message(
            f"epoch {epoch + 1}/{self.progress.total // steps_per_epoch}: test error "
            f"{evaluation['err']:.2f}%, "
            f"architecture {report.architecture}, pruning rate {report.pruning_rate:.1f}%"
        )
        self.checkpointer.save(step, state, progress_record, {BEST_METRIC: evaluation["err"]})
        return state, progress_record

    def _chunk(self, epoch, phase, state, start, end, progress_record) -> TrainState:
        """Steps ``start..end-1`` of an epoch, then one metrics record; saves and raises
        :class:`Preempted` when asked to stop (checked after each dispatch, for each of its
        steps)."""
        steps_per_epoch = self.inputs.steps_per_epoch
        started = time.perf_counter()
        chunk = []
        step = epoch * steps_per_epoch + start
        for count in dispatch_counts(start, end, self.steps_per_dispatch):
            state, step_metrics = self._dispatch(phase, state, count)
            chunk.append(step_metrics)
            reached = [self.checkpointer.reached_preemption(step + i + 1) for i in range(count)]
            step += count
            if self.stop.requested or any(reached):
                self.checkpointer.save(step, state, progress_record)
                raise Preempted(
                    f"stopped at step {step}; checkpoint saved in {self.checkpointer.directory}. "
                    "Rerun the same command to resume."
                )
        fetched = jax.device_get(local_copy(chunk))
        rates = {
            k: float(np.asarray(v).reshape(-1)[-1])
            for k, v in fetched[-1].items()
            if k.startswith(LEARNING_RATE)
        }
        metrics = {
            k: np.concatenate([np.asarray(m[k]).reshape(-1) for m in fetched])
            for k in fetched[0]
            if k not in rates
        }
        elapsed = time.perf_counter() - started
        means = {k: float(np.mean(v)) for k, v in metrics.items()}
        last = epoch * steps_per_epoch + end
        if not np.all(np.isfinite(metrics["loss"])):
            newest = self.checkpointer.latest_step()
            kept = (
                f"the newest checkpoint (step {newest}) is in {self.checkpointer.directory}"
                if newest is not None
                else "no checkpoint was saved before it"
            )
            raise NonFiniteLossError(
                f"the training loss became {means['loss']} within steps "
                f"{last - (end - start) + 1}-{last} (epoch {epoch + 1}); {kept}; lower the "
                "learning rate or the penalty"
            )
        self.writer.write(
            last,
            {
                "epoch": epoch + end / steps_per_epoch,
                **{f"train/{k}": v for k, v in means.items()},
                "train/steps_per_second": (end - start) / elapsed,
                "train/examples_per_second": (end - start) * self.inputs.batch_size / elapsed,
                **rates,
            },
        )
        self.progress.update(end - start, f"loss {means['loss']:.4f} err {means['err']:.2f}%")
        return state

    def _dispatch(self, phase: int, state: TrainState, count: int):
        """The next ``count`` steps in one program: ``(state, metrics)``, each metric stacked
        over the steps when ``count`` > 1."""
        mesh, parts = self.inputs.mesh, [next(self.batches) for _ in range(count)]
        if count == 1:
            return self.train_step(phase, False)(state, *global_batch(mesh, *parts[0]))
        return self.train_step(phase, True)(state, *global_block(mesh, parts))


def _summary(config, data: BatchSource, report: GateReport, progress: dict, steps: int) -> dict:
    errors, seconds = progress["test_errors"], progress["epoch_seconds"]
    median_seconds = statistics.median(seconds) if seconds else None
    return {
        "method": config.method,
        "model": config.model,
        "dataset": data.name,
        "data_source": data.source,
        "epochs": progress["epoch"],
        "steps_per_epoch": steps,
        "batch_size": config.batch_size,
        "evaluated_parameters": "ema" if config.ema_decay else "raw",
        "ema_decay": config.ema_decay,
        "test_error": errors[-1] if errors else None,
        "best_test_error": min(errors) if errors else None,
        "active_units": list(report.active_units.values()),
        "architecture": report.architecture,
        "gate_slots": list(report.active_units),
        "dense_units": list(report.slot_sizes.values()),
        "pruning_rate": report.pruning_rate,
        "expected_l0": report.expected_l0,
        "expected_flops": report.expected_flops,
        "flops": report.flops,
        "dense_flops": report.dense_flops,
        "params": report.params,
        "dense_params": report.dense_params,
        "seconds_per_epoch": median_seconds,
        "examples_per_second": steps * config.batch_size / median_seconds
        if median_seconds
        else None,
        "num_devices": jax.device_count(),
        "fsdp": config.get("fsdp", 1),
        "num_processes": jax.process_count(),
    }
