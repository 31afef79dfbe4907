"""One CML model trained across processes with torch.distributed, its tables sharded by rows.

    torchrun --nproc_per_node 2 -m cml_rs train citeulike-t --out model.npz

    # or, in a script that torchrun starts on every rank:
    world = cml_rs.distributed.init()            # gloo on CPU, nccl on GPUs
    cml_rs.distributed.fit(model, train, validation=valid, checkpoint="fit.ckpt")
    if world.rank == 0:
        model.save("model.npz")                  # rank 0 holds the gathered model

The schedule is PyTorch-BigGraph's (Lerer et al., SysML 2019), adapted to WARP.
Rank r of N owns the users u with u % N == r, their vectors and optimiser
state, for the whole fit; the items are cut the same way into N blocks. An
epoch has N rounds: in round t, rank r trains its users' pairs whose item is
in block (r + t) % N, with negatives drawn from that block, then passes the
block (vectors and optimiser state) to rank r - 1 and takes the next one from
rank r + 1. So a rank holds 1/N of the users and one of N item blocks at any
time, every pair is trained once an epoch, and each rank sends the item table
(with its AdaGrad sums) once an epoch, whatever the number of interactions.

Why not an all_to_all of the rows each batch needs: a pair needs its user, its
positive and U = 20 negatives, 22 rows of 100 floats, 8.8 kB; at 10 billion
interactions that is 88 TB an epoch, against 8 GB (10M items x 100 floats x 2)
per rank here. The price of the blocks: a round's negatives come from 1/N of
the catalogue (uniform there, and over the epoch every block serves), and
the WARP rank is estimated over the whole catalogue from the block's impostor
rate. Plain DDP would replicate both tables on every rank; this never does.

What else differs from one process: the covariance penalty is taken over the
rows a rank holds (all of them, the batch's, or a sample, per
``covariance_rows``); with confidence weights a block draws as many pairs as
it holds, weighted within the block; popularity-weighted negatives count
popularity among the rank's users. Validation and the final model are
gathered to rank 0 (its memory then holds the item table and, at the end, the
user table); checkpoints are sharded, one file per rank, and
:func:`load_shards` assembles them into a model in one process. CML+F
(feature networks) is not sharded yet and is refused.

A rank that dies makes the others fail at their next exchange with
:class:`DistributedError` (gloo notices the closed connection; a silent peer
is caught by the group's timeout), and a restart with the same checkpoint
resumes from the last epoch every rank saved.
"""

from __future__ import annotations

import atexit
import datetime
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist

from ._checks import as_csr, check_int
from ._io import open_npz
from .evaluation import ranking_metrics_at_k
from .nn import CMLEmbedding
from .training import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    Trainer,
    _callback_caller,
    _evaluation_users,
    _unflatten,
    digest_matrices,
    resolve_negatives,
    restore,
    snapshot,
    torch_threads,
    warp_sampler,
)

if TYPE_CHECKING:
    from .model import CollaborativeMetricLearning

__all__ = ["DistributedError", "World", "block_pairs", "fit", "init", "load_shards", "shard_of"]

#: Seconds a collective may wait for a peer before the group gives up (a hung rank).
DEFAULT_TIMEOUT = 300.0


class DistributedError(RuntimeError):
    """The process group failed: a rank died, hung or could not be reached."""


@dataclass(frozen=True)
class World:
    """This process's place in the group."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def device(self) -> torch.device:
        """Where this rank's tensors live: its own GPU under nccl, else the CPU."""
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")


def init(backend: str | None = None, timeout_seconds: float = DEFAULT_TIMEOUT) -> World:
    """Joins the process group that torchrun (or the RANK / WORLD_SIZE / MASTER_ADDR /
    MASTER_PORT variables) describes; ``backend`` None picks nccl when this process
    has a GPU, else gloo. Without those variables, a group of one. Idempotent."""
    if dist.is_available() and dist.is_initialized():
        return _current()
    if backend not in (None, "gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo', 'nccl' or None (automatic), got {backend!r}")
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK {rank} must be below WORLD_SIZE {world_size}")
    chosen = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if chosen == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("backend 'nccl' needs a GPU, and torch sees none; use 'gloo'")
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    _import_what_holds_the_group()
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    try:
        dist.init_process_group(
            chosen,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=float(timeout_seconds)),
        )
    except (RuntimeError, ValueError) as error:
        raise DistributedError(f"could not join the process group as rank {rank} of {world_size}: {error}") from None
    atexit.register(_leave_group)
    return _current()


def _import_what_holds_the_group() -> None:
    """Imports torch._dynamo before the group exists. An optimiser's first step imports
    it, and with it torch.distributed._shard, which, imported while a group is up, keeps
    a reference to that group: destroy_process_group then cannot free it, its gloo
    threads outlive it, and the interpreter's teardown can abort ("terminate called
    without an active exception"). A torch without it has nothing to import late."""
    try:
        import torch._dynamo  # noqa: F401
    except ImportError:
        pass


def _leave_group() -> None:
    """At interpreter exit, leaves the group before Python tears down: a group left to die
    with the process can abort it ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _current() -> World:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    return World(rank, world_size, _env_int("LOCAL_RANK", rank), dist.get_backend())


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def shard_of(n: int, part: int, parts: int) -> np.ndarray:
    """The ids of ``range(n)`` in shard ``part`` of ``parts``: those with id % parts == part."""
    return np.arange(part, n, parts, dtype=np.int64)


def block_pairs(train: sp.csr_matrix, rank: int, world_size: int) -> dict[int, sp.csr_matrix]:
    """The training pairs rank ``rank`` trains, by item block: block b holds the pairs of
    the rank's users with the items of block b, as a matrix in local ids (row k is user
    k * world_size + rank, column k item k * world_size + b). Empty blocks are left out."""
    return _blocks(train[shard_of(train.shape[0], rank, world_size)], world_size)


def _blocks(shard: sp.csr_matrix, world_size: int) -> dict[int, sp.csr_matrix]:
    """A user shard's pairs cut by item block (see :func:`block_pairs`)."""
    blocks = {}
    for block in range(world_size):
        pairs = shard[:, shard_of(shard.shape[1], block, world_size)].tocsr()
        if pairs.nnz:
            blocks[block] = pairs
    return blocks


class _Channel:
    """torch.distributed calls that count the bytes this rank sends and turn a failed
    exchange (a dead or silent peer) into a DistributedError naming what was under way."""

    def __init__(self, world: World, checkpoint: str | os.PathLike | None) -> None:
        self.world = world
        self.device = world.device
        self.bytes_sent = 0
        self.checkpoint = checkpoint

    def _fail(self, what: str, error: BaseException) -> DistributedError:
        resume = (
            f"; a restart with checkpoint {self.checkpoint} resumes from the last epoch every rank saved"
            if self.checkpoint is not None
            else ""
        )
        return DistributedError(
            f"rank {self.world.rank} of {self.world.world_size} lost the other ranks during {what} "
            f"(a process died, hung or cannot be reached: {str(error).splitlines()[0] if str(error) else error!r})"
            f"{resume}"
        )

    def call(self, what: str, work: Callable[[], Any]) -> Any:
        try:
            return work()
        except DistributedError:
            raise
        except (RuntimeError, ConnectionError) as error:  # DistBackendError is a RuntimeError
            raise self._fail(what, error) from None

    def exchange(self, send: torch.Tensor, receive: torch.Tensor, to: int, source: int, what: str) -> None:
        """Sends ``send`` to rank ``to`` while receiving ``receive`` from rank ``source``."""
        self.bytes_sent += send.numel() * send.element_size()

        def work() -> None:
            ops = [dist.P2POp(dist.isend, send, to), dist.P2POp(dist.irecv, receive, source)]
            for request in dist.batch_isend_irecv(ops):
                request.wait()

        self.call(what, work)

    def gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor] | None:
        """Equal-shaped tensors of every rank, on rank 0 (None elsewhere)."""
        tensor = tensor.to(self.device).contiguous()
        if self.world.rank != 0:
            self.bytes_sent += tensor.numel() * tensor.element_size()
        parts = [torch.empty_like(tensor) for _ in range(self.world.world_size)] if self.world.rank == 0 else None
        self.call(what, lambda: dist.gather(tensor, parts, dst=0))
        return [p.cpu() for p in parts] if parts is not None else None

    def all_sum(self, values: list[float], what: str) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.bytes_sent += tensor.numel() * tensor.element_size()
        self.call(what, lambda: dist.all_reduce(tensor))
        return tensor.cpu().tolist()

    def objects(self, value: Any, what: str) -> list[Any]:
        """Every rank's ``value`` (small, picklable), on every rank."""
        values: list[Any] = [None] * self.world.world_size
        self.call(what, lambda: dist.all_gather_object(values, value))
        return values

    def from_rank0(self, value: Any, what: str) -> Any:
        """Rank 0's ``value`` (small, picklable), on every rank."""
        box = [value]
        self.call(what, lambda: dist.broadcast_object_list(box, src=0))
        return box[0]


def _agree(channel: _Channel, error: BaseException | None, what: str) -> None:
    """Raises on every rank if any rank failed ``what`` (so that none waits for it forever)."""
    failures = channel.objects(None if error is None else f"{type(error).__name__}: {error}", what)
    problems = [(rank, message) for rank, message in enumerate(failures) if message is not None]
    if not problems:
        return
    if error is not None:
        raise error
    rank, message = problems[0]
    raise ValueError(f"rank {rank} failed while {what}: {message.partition(': ')[2]}")


class _ShardedFit:
    """One rank's part of a fit: its users, the item block it holds, the samplers of
    its (user shard x item block) pairs, and the exchanges between rounds."""

    def __init__(
        self,
        model: CollaborativeMetricLearning,
        train: sp.csr_matrix,
        validation: sp.csr_matrix | None,
        world: World,
        channel: _Channel,
        data_hash: str,
    ) -> None:
        from .model import CollaborativeMetricLearning

        self.model, self.world, self.channel = model, world, channel
        self.train, self.validation = train, validation
        rank, n = world.rank, world.world_size
        n_users, n_items = train.shape
        self.user_ids = shard_of(n_users, rank, n)
        self.block_items = [shard_of(n_items, block, n) for block in range(n)]
        shard = train[self.user_ids]
        if shard.nnz == 0:
            raise ValueError(
                f"rank {rank} holds no training pairs: none of its users (ids = {rank} mod {n}) has an "
                f"interaction; use fewer ranks or drop users without interactions"
            )
        # The local model: this rank's users and its home item block, same settings.
        settings = model.hyperparameters()
        settings["random_state"] = _derived_seed(model.random_state, rank)
        if world.backend == "nccl":
            settings["device"] = str(world.device)
        self.local = CollaborativeMetricLearning(**settings)
        generator = torch.Generator().manual_seed(_derived_seed(model.random_state, rank))
        self.local.embedding_ = CMLEmbedding(
            len(self.user_ids), len(self.block_items[rank]), model.factors, model.max_norm, generator=generator
        ).to(self.local.device)
        # One sampler per item block that this rank's users have pairs with; U comes
        # from the whole matrix (a block's density is not the data's).
        resolve_negatives(model, train)
        self.local.n_negatives_ = model.n_negatives_
        self.samplers: dict[int, Any] = {}
        for block, pairs in _blocks(shard, n).items():
            try:
                self.samplers[block] = warp_sampler(model, pairs, seed=_derived_seed(model.random_state, rank, block))
            except ValueError as error:
                raise ValueError(
                    f"with {n} ranks, item block {block} ({pairs.shape[1]} items) cannot serve rank {rank}'s "
                    f"users: {error}; use fewer ranks"
                ) from None
        self.trainer = Trainer(
            self.local,
            shard,
            None,
            sampler=next(iter(self.samplers.values())),
            catalogue_size=n_items,
            identity=f"rank {rank} of {n}; data {data_hash}",
        )
        public = {k: v for k, v in model.hyperparameters().items() if k != "device"}
        self.trainer.checkpoint_meta = {"settings": public, "shape": [n_users, n_items], "world_size": n}
        self.rows_state = _ensure_row_state(self.trainer.optimizer, self.local.embedding_.items)

    # ------------------------------------------------------------------ one epoch

    def epoch(self, epoch: int) -> tuple[float, int, int]:
        """N rounds, one item block each, then the home block is back; returns the
        summed loss of this rank's steps, their number and the pairs they trained."""
        rank, n = self.world.rank, self.world.world_size
        total, steps, pairs = 0.0, 0, 0
        for round_ in range(n):
            block = (rank + round_) % n
            sampler = self.samplers.get(block)
            if sampler is not None:
                self.trainer.sampler, self.trainer.n_items = sampler, len(self.block_items[block])
                sampler.set_epoch(epoch)
                for batch in sampler:
                    total += self.trainer.step(batch, epoch, steps)
                    steps, pairs = steps + 1, pairs + len(batch[0])
            if n > 1:
                self.rotate(incoming=(block + 1) % n, what=f"epoch {epoch}, round {round_}")
        return total, steps, pairs

    def rotate(self, incoming: int, what: str) -> None:
        """Passes the held item block (vectors, optimiser state) to rank - 1 and takes
        block ``incoming`` from rank + 1. Tensor by tensor, received straight into the
        buffers that become the new block: at most two blocks are held at once."""
        rank, n = self.world.rank, self.world.world_size
        to, source, device = (rank - 1) % n, (rank + 1) % n, self.channel.device
        items = self.local.embedding_.items
        state = self.trainer.optimizer.state[items]
        rows = len(self.block_items[incoming])
        received = []
        for tensor in [items.detach()] + [state[k] for k in self.rows_state]:
            buffer = torch.empty((rows, tensor.shape[1]), dtype=tensor.dtype, device=device)
            self.channel.exchange(tensor.contiguous().to(device), buffer, to, source, f"the item exchange of {what}")
            received.append(buffer.to(items.device))
        scalars = [k for k in state if k not in self.rows_state]  # step counts
        if scalars:
            values = torch.tensor([float(state[k]) for k in scalars], dtype=torch.float64, device=device)
            buffer = torch.empty_like(values)
            self.channel.exchange(values, buffer, to, source, f"the item exchange of {what}")
            for key, value in zip(scalars, buffer.cpu().tolist()):
                old = state[key]
                state[key] = torch.tensor(value, dtype=old.dtype) if isinstance(old, torch.Tensor) else type(old)(value)
        with torch.no_grad():
            items.data = received[0]
        for key, tensor in zip(self.rows_state, received[1:]):
            state[key] = tensor

    # ------------------------------------------------------------------ gathering

    def gather_items(self, what: str) -> np.ndarray | None:
        """The whole item table on rank 0 (every rank holds its home block)."""
        n_items = self.train.shape[1]
        parts = self.gather_rows(self.local.embedding_.items.detach(), len(self.block_items[0]), what)
        if parts is None:
            return None
        items = np.empty((n_items, self.model.factors), np.float32)
        for block, part in enumerate(parts):
            items[self.block_items[block]] = part[: len(self.block_items[block])]
        return items

    def gather_users(self, ids: np.ndarray, what: str) -> np.ndarray | None:
        """The vectors of users ``ids`` (known to every rank), on rank 0."""
        n = self.world.world_size
        owner = ids % n
        longest = max(int(np.sum(owner == r)) for r in range(n)) if len(ids) else 0
        mine = ids[owner == self.world.rank] // n
        parts = self.gather_rows(self.local.embedding_.users.detach()[torch.from_numpy(mine)], longest, what)
        if parts is None:
            return None
        users = np.empty((len(ids), self.model.factors), np.float32)
        for r, part in enumerate(parts):
            where = np.flatnonzero(owner == r)
            users[where] = part[: len(where)]
        return users

    def gather_rows(self, rows: torch.Tensor, longest: int, what: str) -> list[np.ndarray] | None:
        padded = torch.zeros((longest, rows.shape[1]), dtype=torch.float32, device=rows.device)
        padded[: len(rows)] = rows
        parts = self.channel.gather(padded, what)
        return None if parts is None else [p.numpy() for p in parts]


def _ensure_row_state(optimizer: torch.optim.Optimizer, items: torch.nn.Parameter) -> list[str]:
    """The names of ``items``' per-row optimiser state, created now if the optimiser
    creates it lazily (Adam), so that every rank sends the same kind of block."""
    state = optimizer.state[items]
    if not state:
        if isinstance(optimizer, torch.optim.SparseAdam):
            state["step"] = 0
        else:
            state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(items, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(items, memory_format=torch.preserve_format)
    return [k for k, v in state.items() if isinstance(v, torch.Tensor) and v.shape == items.shape]


def _derived_seed(seed: int, *parts: int) -> int:
    """A seed for one rank (and block) from the model's, the same on every run."""
    return int(np.random.SeedSequence([seed, *parts]).generate_state(1, np.uint64)[0] >> 1)


def _data_hash(train: sp.csr_matrix, validation: sp.csr_matrix | None) -> str:
    import hashlib

    digest = hashlib.sha256()
    digest_matrices(digest, (train, validation))
    return digest.hexdigest()[:16]


def _shard_path(checkpoint: str | os.PathLike, rank: int, world_size: int, previous: bool = False) -> Path:
    base = Path(checkpoint)
    return base.with_name(f"{base.name}.rank{rank}-of-{world_size}{'.previous' if previous else ''}.npz")


def _checkpoint_epochs(checkpoint: str | os.PathLike, world: World) -> dict[int, Path]:
    """The epochs this rank's checkpoint files hold, each with its file."""
    epochs = {}
    for previous in (False, True):
        path = _shard_path(checkpoint, world.rank, world.world_size, previous)
        if path.exists():
            with open_npz(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION) as reader:
                epoch = reader.meta.get("epoch")
            if isinstance(epoch, int):
                epochs[epoch] = path
    return epochs


def fit(
    model: CollaborativeMetricLearning,
    user_items: Any,
    validation: Any | None = None,
    *,
    show_progress: bool = True,
    callback: Callable[..., Any] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
) -> CollaborativeMetricLearning:
    """Trains ``model`` on ``user_items`` across the ranks of the process group
    (:func:`init` joins it), each rank holding 1/N of the vectors.

    Every rank must pass the same data and settings (checked by a hash). With
    one rank this is ``model.fit``. Early stopping follows validation recall
    measured on rank 0; ``callback`` runs on rank 0 (returning False stops
    every rank). With ``checkpoint``, each rank writes its shard there
    (``<checkpoint>.rank<r>-of-<N>.npz``, the previous epoch kept beside it)
    every ``checkpoint_every`` epochs, and a restart resumes from the last
    epoch all ranks hold.

    Returns the model: fitted (all vectors gathered) on rank 0, left unfitted
    on the other ranks. A group you create yourself with init_process_group
    should come after ``import torch._dynamo``, as :func:`init` does; else the
    fit's imports keep the group alive past destroy_process_group, and its
    threads can abort the interpreter's exit.
    """
    world = init() if not (dist.is_available() and dist.is_initialized()) else _current()
    if world.world_size == 1:
        return model.fit(
            user_items,
            validation=validation,
            show_progress=show_progress,
            callback=callback,
            checkpoint=checkpoint,
            checkpoint_every=checkpoint_every,
        )
    channel = _Channel(world, checkpoint)
    error: BaseException | None = None
    sharded = None
    train = valid = None
    try:
        checkpoint_every = check_int(checkpoint_every, "checkpoint_every")
        train = as_csr(user_items, "user_items")
        valid = as_csr(validation, "validation") if validation is not None else None
        if valid is not None and valid.shape != train.shape:
            raise ValueError(f"validation has shape {valid.shape} but user_items has {train.shape}")
        n_users, n_items = train.shape
        if min(n_users, n_items) < world.world_size:
            raise ValueError(
                f"world_size {world.world_size} exceeds the {n_users} users or {n_items} items; every rank "
                f"needs at least one of each (use at most {min(n_users, n_items)} ranks)"
            )
        if train.nnz == 0:
            raise ValueError(f"user_items {train.shape} holds no interactions; there is nothing to learn from")
        if not np.all(np.isfinite(train.data)) or train.data.min() < 0:
            raise ValueError("user_items holds NaN, infinite or negative values; confidence weights are >= 0")
    except (ValueError, TypeError) as caught:
        error = caught
    _agree(channel, error, "checking user_items")
    assert train is not None
    # Every rank must hold the same data and settings.
    settings = {k: v for k, v in model.hyperparameters().items() if k not in ("device", "num_threads")}
    data_hash = _data_hash(train, valid)
    identity = (data_hash, sorted(settings.items()))
    identities = channel.objects(identity, "comparing the data of the ranks")
    differ = [r for r, other in enumerate(identities) if other != identities[0]]
    if differ:
        what = "training data" if identities[differ[0]][0] != identities[0][0] else "settings"
        raise ValueError(
            f"rank {differ[0]} holds other {what} than rank 0 (hash {identities[differ[0]][0]} vs "
            f"{identities[0][0]}); every rank must load the same data with the same settings"
        )
    try:
        with torch_threads(model.num_threads):
            sharded = _ShardedFit(model, train, valid, world, channel, data_hash)
    except ValueError as caught:
        error = caught
    _agree(channel, error, "setting up its shard")
    assert sharded is not None
    with torch_threads(model.num_threads):
        _run(sharded, valid, show_progress, callback, checkpoint, checkpoint_every)
        _gather_model(sharded)
    return model


def _run(
    sharded: _ShardedFit,
    validation: sp.csr_matrix | None,
    show_progress: bool,
    callback: Callable[..., Any] | None,
    checkpoint: str | os.PathLike | None,
    checkpoint_every: int,
) -> None:
    """The epochs: train, sum the loss, evaluate on rank 0, agree on stopping, checkpoint."""
    from tqdm.auto import tqdm

    model, local, trainer, channel, world = (
        sharded.model,
        sharded.local,
        sharded.trainer,
        sharded.channel,
        sharded.world,
    )
    eval_users = _evaluation_users(validation, model.eval_users, model.random_state)
    local.history_, model.best_epoch_ = [], None
    first_epoch = _resume(sharded, checkpoint) if checkpoint is not None else 0
    if first_epoch < 0:  # the checkpoint is of the finished fit
        first_epoch = model.epochs
    report = _callback_caller(callback) if world.rank == 0 else (lambda *_: None)
    bar = tqdm(
        total=model.epochs,
        initial=first_epoch,
        disable=not show_progress or world.rank != 0,
        unit="epoch",
        desc=f"CML on {world.world_size} ranks ({world.backend})",
    )
    start = time.perf_counter() - (local.history_[-1]["elapsed"] if local.history_ else 0.0)
    try:
        for epoch in range(first_epoch, model.epochs):
            epoch_start = time.perf_counter()
            loss, steps, pairs = sharded.epoch(epoch)
            loss, steps, pairs = channel.all_sum([loss, steps, pairs], f"summing the loss of epoch {epoch}")
            check = (epoch + 1) % model.eval_every == 0 or epoch + 1 == model.epochs
            metrics: dict[str, float] = {}
            if validation is not None and check:
                metrics = _evaluate(sharded, validation, eval_users, epoch)
            elapsed = time.perf_counter() - start
            entry = {
                "epoch": epoch,
                "loss": loss,
                "elapsed": elapsed,
                "epoch_seconds": time.perf_counter() - epoch_start,
                "steps": int(steps),
                "pairs": int(pairs),
                "bytes_sent": channel.bytes_sent,
                **metrics,
            }
            local.history_.append(entry)
            plateaued = validation is None and check and trainer.loss_plateaued(loss)
            stop = report(epoch, elapsed, loss, metrics) is False
            stop = channel.from_rank0(stop, "agreeing to stop")
            stop = stop or plateaued or (validation is not None and trainer.stale >= model.patience)
            bar.set_postfix({"loss": f"{loss:.4g}", **({"best": f"{trainer.best_recall:.4f}"} if metrics else {})})
            bar.update(1)
            last = stop or epoch + 1 == model.epochs
            if checkpoint is not None and ((epoch + 1) % checkpoint_every == 0 or last):
                _save_shard(sharded, checkpoint, epoch, last)
            if stop:
                break
    finally:
        bar.close()
    if trainer.best_state is not None:
        restore(local, trainer.best_state)


def _evaluate(
    sharded: _ShardedFit, validation: sp.csr_matrix, eval_users: np.ndarray | None, epoch: int
) -> dict[str, float]:
    """Validation metrics of the gathered model on rank 0, shared with every rank, and
    the early-stopping bookkeeping (each rank snapshots its shard when recall improves)."""
    model, trainer, channel = sharded.model, sharded.trainer, sharded.channel
    users = eval_users if eval_users is not None else np.arange(validation.shape[0])
    what = f"the validation of epoch {epoch}"
    items = sharded.gather_items(what)
    user_vectors = sharded.gather_users(users, what)
    metrics = None
    if items is not None and user_vectors is not None:
        result = ranking_metrics_at_k(
            (user_vectors, items),
            sharded.train[users],
            validation[users],
            K=model.eval_k,
            num_threads=model.num_threads,
        )
        metrics = {f"{name}@{model.eval_k}": result[name] for name in ("recall", "precision", "ndcg", "map")}
    metrics = channel.from_rank0(metrics, what)
    recall = trainer.latest_recall = metrics[f"recall@{model.eval_k}"]
    if recall > trainer.best_recall:
        trainer.best_recall, trainer.best_state, trainer.stale = recall, snapshot(sharded.local), 0
        model.best_epoch_ = sharded.local.best_epoch_ = epoch
    else:
        trainer.stale += 1
    return metrics


def _save_shard(sharded: _ShardedFit, checkpoint: str | os.PathLike, epoch: int, finished: bool) -> None:
    """This rank's checkpoint, the one before kept (a rank may die between two ranks' saves)."""
    world = sharded.world
    current = _shard_path(checkpoint, world.rank, world.world_size)
    if current.exists():
        os.replace(current, _shard_path(checkpoint, world.rank, world.world_size, previous=True))
    sharded.trainer.save_checkpoint(current, epoch, finished)


def _resume(sharded: _ShardedFit, checkpoint: str | os.PathLike) -> int:
    """Loads the latest epoch that every rank's checkpoint holds; returns the next epoch
    (0 without checkpoints, -1 when the fit had finished)."""
    world, channel = sharded.world, sharded.channel
    base = Path(checkpoint)
    foreign = sorted(
        p.name
        for p in base.parent.glob(f"{base.name}.rank*-of-*.npz")
        if not p.name.startswith(f"{base.name}.rank{world.rank}-of-{world.world_size}.")
        and not any(p.name.startswith(f"{base.name}.rank{r}-of-{world.world_size}.") for r in range(world.world_size))
    )
    error = None
    epochs: dict[int, Path] = {}
    try:
        if foreign:
            raise ValueError(
                f"{base.parent / foreign[0]} belongs to a fit with another number of ranks; resume with that many "
                f"ranks, or delete the {base.name}.rank* files to start over"
            )
        epochs = _checkpoint_epochs(checkpoint, world)
    except (ValueError, OSError) as caught:
        error = caught
    _agree(channel, error, "reading its checkpoint")
    held = channel.objects(sorted(epochs), "agreeing on the epoch to resume from")
    if not any(held):
        return 0
    common = set(held[0]).intersection(*held[1:])
    if not common:
        raise ValueError(
            f"the checkpoint shards of {base} hold no common epoch (rank: epochs {dict(enumerate(held))}); "
            f"delete them to start over"
        )
    epoch = max(common)
    try:
        next_epoch, finished = sharded.trainer.load_checkpoint(epochs[epoch])
    except ValueError as caught:
        error, next_epoch, finished = caught, 0, False
    _agree(channel, error, "loading its checkpoint")
    sharded.model.best_epoch_ = sharded.local.best_epoch_
    return -1 if finished else next_epoch


def _gather_model(sharded: _ShardedFit) -> None:
    """The whole model on rank 0 (with the best state every rank restored)."""
    model, world = sharded.model, sharded.world
    n_users = sharded.train.shape[0]
    items = sharded.gather_items("gathering the model")
    users = sharded.gather_users(np.arange(n_users), "gathering the model")
    if world.rank == 0:
        assert items is not None and users is not None
        model.embedding_ = CMLEmbedding.from_vectors(
            torch.from_numpy(users), torch.from_numpy(items), model.max_norm
        ).to(model.device)
        model.item_network_ = model.user_network_ = None
        model.item_feature_layout_ = model.user_feature_layout_ = None
        model._indexes.clear()
    model.history_ = list(sharded.local.history_)  # every rank: its own bytes_sent


def load_shards(checkpoint: str | os.PathLike) -> CollaborativeMetricLearning:
    """The model that the sharded checkpoint ``checkpoint`` holds, assembled in this
    process (e.g. to keep the last good state of a fit that stopped)."""
    from .model import CollaborativeMetricLearning

    base = Path(checkpoint)
    files = sorted(base.parent.glob(f"{base.name}.rank*-of-*.npz"))
    files = [f for f in files if not f.name.endswith(".previous.npz")]
    if not files:
        raise FileNotFoundError(f"no checkpoint shards {base.name}.rank<r>-of-<N>.npz in {base.parent}")
    sizes = {f.name.rsplit("-of-", 1)[1].split(".")[0] for f in files}
    if len(sizes) != 1:
        raise ValueError(f"{base}: shards of fits with different numbers of ranks ({sorted(sizes)}) lie there")
    n = int(sizes.pop())
    shards = []
    for rank in range(n):
        path = _shard_path(base, rank, n)
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing; the checkpoint needs all {n} shards")
        with open_npz(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION) as reader:
            tree = _unflatten(reader.meta["state"], reader)
            settings = reader.meta.get("settings")
            shards.append((reader.meta, tree["best"] or tree["model"], settings))
    epochs = {meta["epoch"] for meta, _, _ in shards}
    if len(epochs) != 1:
        raise ValueError(f"{base}: the shards hold different epochs {sorted(epochs)}; the fit stopped between saves")
    meta0, _, settings = shards[0]
    if not isinstance(settings, dict):
        raise ValueError(f"{base}: the shards do not record the model's settings; the files are damaged")
    shapes = meta0.get("shape")
    n_users, n_items = int(shapes[0]), int(shapes[1])
    model = CollaborativeMetricLearning(**settings)
    users = np.empty((n_users, model.factors), np.float32)
    items = np.empty((n_items, model.factors), np.float32)
    for rank, (_, state, _) in enumerate(shards):
        embedding = state[0]
        users[shard_of(n_users, rank, n)] = embedding["users"].numpy()
        items[shard_of(n_items, rank, n)] = embedding["items"].numpy()
    model.embedding_ = CMLEmbedding.from_vectors(torch.from_numpy(users), torch.from_numpy(items), model.max_norm)
    model.history_ = list(meta0.get("history") or [])
    model.best_epoch_ = meta0.get("best_epoch")
    return model
