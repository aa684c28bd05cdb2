"""The one seam to DeepSpeed and torch.distributed.

Every other module talks to ranks, engines and checkpoints through this file, so that the rest
of msl_ds can be read (and unit-tested) without launching ranks. Works with every launcher that
sets the usual environment (deepspeed, torchrun, multi-node ``--no_ssh``) and with ``mpirun``
through mpi4py discovery; on a CPU box it falls back to gloo.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import logging
import os
import sys
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _deepspeed():
    import deepspeed  # imported lazily: importing it probes accelerators and is slow

    return deepspeed


DEFAULT_MASTER_PORT = 29500  # torch's and DeepSpeed's default rendezvous port
SLURM_PORT_SPREAD = 1000  # under SLURM without MASTER_PORT: DEFAULT_MASTER_PORT + job id modulo this


def init(backend: str = "auto", timeout_s: int = 1800, threads_per_rank: int = 0) -> None:
    """Initialise the process group for whichever launcher started us (idempotent).

    Rank, world size and local rank come from the launcher (:func:`discover`); the CUDA device is
    bound before the process group starts and passed as ``device_id`` where torch supports it. The
    group is destroyed at interpreter exit if :func:`shutdown` was not reached (an error path).
    """
    if dist.is_available() and dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    launcher = discover()
    _TIMEOUT["s"] = timeout_s
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict[str, Any] = {}
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())  # before the group: NCCL must not guess the device
        if backend == "nccl" and world_size_env() > 1 and _device_id_supported():
            kwargs["device_id"] = torch.device("cuda", local_rank())
    with _collective(f"process-group rendezvous ({launcher})"):
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        # DeepSpeed wraps the group that exists (its CPU shm all-reduce included); all of RANK,
        # WORLD_SIZE, MASTER_ADDR, MASTER_PORT and LOCAL_RANK are set, so it does no discovery
        _deepspeed().init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout, verbose=False)
    _use_reduce_scatter_single()
    atexit.register(_destroy_at_exit)
    if not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "0")) or _local_world_size()
        threads = threads_per_rank or max(1, (os.cpu_count() or 1) // max(local, 1))
        torch.set_num_threads(threads)
    _unlink_shm_workspace()


def _use_reduce_scatter_single() -> None:
    """Point DeepSpeed's reduce-scatter at ``torch.distributed.reduce_scatter_single``.

    DeepSpeed (0.19) reduce-scatters ZeRO gradients through ``reduce_scatter_tensor``, which torch
    2.13 deprecated with a FutureWarning (seen at every training step) in favour of
    ``reduce_scatter_single``, the function it now merely forwards to: same arguments, same result.
    Where either side differs (an older torch, another DeepSpeed backend), nothing is changed.
    """
    import deepspeed.comm.comm as ds_comm

    single = getattr(dist, "reduce_scatter_single", None)
    cdb = ds_comm.cdb
    if single is not None and getattr(cdb, "reduce_scatter_function", None) is getattr(
        dist, "reduce_scatter_tensor", 0
    ):
        cdb.reduce_scatter_function = single


def world_size_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _device_id_supported() -> bool:
    """``init_process_group(device_id=...)`` exists (torch >= 2.3) and does not hang (2.6.0 < torch < 2.7.1
    do: pytorch/pytorch#153960)."""
    import inspect

    from packaging import version

    if "device_id" not in inspect.signature(dist.init_process_group).parameters:
        return False
    v = version.parse(torch.__version__.split("+")[0])
    return not version.parse("2.6.0") < v < version.parse("2.7.1")


MPI_RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")


def discover() -> str:
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT; say from where.

    In order: a launcher that sets RANK (deepspeed, torchrun); SLURM (``srun``: SLURM_PROCID,
    SLURM_STEP_NUM_TASKS or SLURM_NTASKS, SLURM_LOCALID, the first host of the node list); MPI
    (``mpirun``: mpi4py's COMM_WORLD, ``pip install msl_ds[mpi]``); else a world of one. A
    MASTER_ADDR or MASTER_PORT the user set is never replaced.
    """
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        source = "environment (RANK/WORLD_SIZE)"
    elif "SLURM_PROCID" in env and ("SLURM_STEP_NUM_TASKS" in env or "SLURM_NTASKS" in env):
        source = "SLURM"
        _from_slurm(env)
    elif any(v in env for v in MPI_RANK_VARS):
        source = "MPI"
        _from_mpi(env)
    else:  # plain `python launch/train.py`: a world of one
        source = "single process"
        env.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    env.setdefault("LOCAL_RANK", env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0"))
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    env.setdefault("MASTER_PORT", str(DEFAULT_MASTER_PORT))
    return source


def _from_slurm(env: os._Environ) -> None:
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1"))
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    per_node = slurm_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "")))
    node = int(env.get("SLURM_NODEID", "0"))
    if per_node and node < len(per_node):
        env["LOCAL_WORLD_SIZE"] = str(per_node[node])
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in env and nodes:
        env["MASTER_ADDR"] = first_host(nodes)
    if "MASTER_PORT" not in env and env.get("SLURM_JOB_ID", "").isdigit():
        env["MASTER_PORT"] = str(DEFAULT_MASTER_PORT + int(env["SLURM_JOB_ID"]) % SLURM_PORT_SPREAD)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[07-09,12]-ib,cpu1`` -> ``gpu07-ib``."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    head = nodelist[:end].strip()
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    inside, _, suffix = rest.partition("]")
    return prefix + inside.split(",")[0].split("-")[0] + suffix


def slurm_tasks_per_node(spec: str) -> list[int]:
    """``2(x3),1`` -> ``[2, 2, 2, 1]`` (SLURM_TASKS_PER_NODE's compressed form)."""
    out: list[int] = []
    for part in (p for p in spec.split(",") if p.strip()):
        count, _, times = part.partition("(x")
        if not count.strip().isdigit():
            return []
        out += [int(count)] * (int(times.rstrip(")")) if times else 1)
    return out


def _from_mpi(env: os._Environ) -> None:
    """Rank, size and node-local rank from mpi4py; rank 0's address as MASTER_ADDR unless given."""
    try:
        from mpi4py import MPI
    except ImportError:  # Open MPI's own variables still say who we are; the address must be given
        if "OMPI_COMM_WORLD_RANK" not in env or "MASTER_ADDR" not in env:
            raise RuntimeError(
                "launched under MPI but mpi4py is not installed: pip install 'msl_ds[mpi]' (or set "
                "MASTER_ADDR, and run under Open MPI)"
            ) from None
        env["RANK"] = env["OMPI_COMM_WORLD_RANK"]
        env["WORLD_SIZE"] = env["OMPI_COMM_WORLD_SIZE"]
        env["LOCAL_RANK"] = env.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        env["LOCAL_WORLD_SIZE"] = env.get("OMPI_COMM_WORLD_LOCAL_SIZE", "1")
        return
    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    env["RANK"], env["WORLD_SIZE"] = str(comm.Get_rank()), str(comm.Get_size())
    env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"] = str(node.Get_rank()), str(node.Get_size())
    node.Free()
    if "MASTER_ADDR" not in env:
        env["MASTER_ADDR"] = comm.bcast(_own_address() if comm.Get_rank() == 0 else None, root=0)


def _own_address() -> str:
    """This host's first address (``hostname -I``), else what its name resolves to."""
    import socket
    import subprocess

    try:
        return subprocess.check_output(["hostname", "-I"], text=True).split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        return socket.gethostbyname(socket.gethostname())


def _unlink_shm_workspace() -> None:
    """Remove the name of DeepSpeed's CPU all-reduce workspace from /dev/shm once every rank has it mapped.

    When all ranks share a host, DeepSpeed's shm comm op creates one ~69 MB segment per rank,
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, and never unlinks it: every
    launch leaks it into RAM-backed tmpfs until reboot (upstream: deepspeedai/DeepSpeed#4115).
    Each rank maps every peer's segment inside ``init_distributed``, so after a barrier the names
    are no longer needed; the mappings stay valid and the memory is freed when the ranks exit,
    even when they are killed.
    """
    if dist.get_world_size() > 1:  # on every rank alike, whether or not the op made a segment
        with _collective("shm workspace barrier"):
            dist.barrier()
    name = "deepspeed_allreduce_buffer_{}_{}_{}_{}".format(
        os.getuid(), os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", ""), dist.get_rank()
    )
    with contextlib.suppress(FileNotFoundError):  # no segment: GPU, multi-node, or torchrun (no LOCAL_SIZE)
        os.unlink(os.path.join("/dev/shm", name))


def build_ops() -> None:
    """Build the C++ op DeepSpeed JIT-compiles on first launch (CPU shm all-reduce), once, up front.

    Without this the first launch on a fresh machine compiles it inside rank 0 (about a minute on
    2 cores) while its peers wait on a lock file; a launch killed mid-compile leaves that lock
    behind and every later launch waits on it forever. ``make setup`` calls this.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)
        log.info("built %s", builder.absolute_name())


def _local_world_size() -> int:
    return int(os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", os.environ.get("WORLD_SIZE", "1")))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", "0")))


def is_rank0() -> bool:
    return rank() == 0


def device() -> torch.device:
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


class CollectiveTimeout(RuntimeError):
    """A collective that another rank did not join within ``deepspeed.timeout_s``."""


_TIMEOUT = {"s": 1800}


@contextlib.contextmanager
def _collective(name: str) -> Iterator[None]:
    """Turn a backend's timeout (gloo: "Timed out waiting 5000ms for recv operation") into an
    error that says what happened and which setting governs it.

    Covers the collectives msl_ds issues itself; DeepSpeed's own (ZeRO-3 gathers inside a
    forward) raise the backend's error unchanged, and NCCL's watchdog aborts the process instead.
    """
    try:
        yield
    except RuntimeError as exc:
        text = str(exc).lower()
        if "timed out" not in text and "timeout" not in text:
            raise
        raise CollectiveTimeout(
            f"{name} on rank {rank()} of {world_size()} timed out after deepspeed.timeout_s={_TIMEOUT['s']} s: "
            f"another rank never joined it (crashed, hung or stuck elsewhere); if ranks legitimately take "
            f"longer between collectives, raise deepspeed.timeout_s. Backend said: {exc}"
        ) from exc


def barrier() -> None:
    if dist.is_initialized():
        with _collective("barrier"):
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s Python object on every rank."""
    if not dist.is_initialized() or world_size() == 1:
        return obj
    box = [obj]
    with _collective("broadcast_object"):
        dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj: Any) -> list[Any]:
    if not dist.is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    with _collective("all_gather_objects"):
        dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(values: list[float]) -> list[float]:
    if not dist.is_initialized() or world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device() if torch.cuda.is_available() else "cpu")
    with _collective("all_reduce_sum"):
        dist.all_reduce(t)
    return t.tolist()


def shard(items: list[Any]) -> tuple[list[Any], int]:
    """This rank's contiguous slice of ``items`` and its offset (same split on every rank)."""
    n, w, r = len(items), world_size(), rank()
    per, extra = divmod(n, w)
    start = r * per + min(r, extra)
    end = start + per + (1 if r < extra else 0)
    return items[start:end], start


def gather_shards(local: list[Any]) -> list[Any]:
    """Concatenate every rank's list in rank order (the inverse of :func:`shard`)."""
    return [x for part in all_gather_objects(local) for x in part]


def rank0_decides(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` evaluated on rank 0 only, its result on every rank.

    Every decision taken from files (is a stage done? is a phase's record there?) and every record
    read back from disk goes through here, so ranks never branch on what their own disk shows:
    on node-local disks the other nodes do not have rank 0's files, and a rank that took another
    branch would wait out the collective timeout.
    """
    return broadcast_object(fn(*args) if is_rank0() else None)


_NODE_LOCAL = {"on": False}


def set_node_local(on: bool) -> None:
    """Say whether ranks on different nodes see different output directories (run.shared_fs)."""
    _NODE_LOCAL["on"] = on


def node_local() -> bool:
    return _NODE_LOCAL["on"]


def is_writer() -> bool:
    """Whether this rank writes the files every rank loads later (exports, checkpoint pointers):
    rank 0 on a shared filesystem, each node's local rank 0 on node-local disks."""
    return is_rank0() or (node_local() and local_rank() == 0)


SHARED_FS_TOKEN = ".shared_fs_token"


def sees_rank0_files(directory: str | os.PathLike) -> list[bool]:
    """Per rank: does it see a token file rank 0 just wrote into ``directory``? (collective)

    Every writer creates ``directory`` first; the token's name carries a nonce, so a stale token
    from an earlier launch never counts.
    """
    import uuid
    from pathlib import Path

    d = Path(directory)
    if local_rank() == 0:
        d.mkdir(parents=True, exist_ok=True)
    nonce = broadcast_object(uuid.uuid4().hex if is_rank0() else None)
    token = d / f"{SHARED_FS_TOKEN}.{nonce}"
    if is_rank0():
        token.write_text(nonce)
    barrier()
    seen = all_gather_objects(token.is_file() and token.read_text() == nonce)
    barrier()
    if is_rank0():
        token.unlink(missing_ok=True)
    return seen


def missing_everywhere(path: str | os.PathLike) -> list[int]:
    """Ranks that do not see ``path`` (collective): checked before a phase that loads it on every rank."""
    from pathlib import Path

    return [r for r, ok in enumerate(all_gather_objects(Path(path).exists())) if not ok]


# --------------------------------------------------------------------------- ZeRO / engines


def zero_init(ds_config: dict[str, Any]):
    """Context under which a model is built already partitioned (ZeRO-3), else a no-op."""
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) == 3:
        stack = contextlib.ExitStack()
        stack.enter_context(reuse_hpz_group())
        stack.enter_context(_deepspeed().zero.Init(config_dict_or_path=ds_config))
        return stack
    return contextlib.nullcontext()


@contextlib.contextmanager
def reuse_hpz_group() -> Iterator[None]:
    """Let a second ZeRO-3 model in this process share hpZ's secondary process groups.

    With ``zero_hpz_partition_size`` > 1, every ``deepspeed.zero.Init`` built from a config
    creates the hpZ groups and asserts that none exist yet ("ZeRO parameter intra parallel group
    is already initialized", DeepSpeed #4901, open; DeepSpeed's engine and optimizer reuse the
    groups, only ``Init`` does not). msl_ds builds one engine per stage (and one for the base
    model) in the same process, so without this the second stage would stop there. Inside this
    context an existing group of the same size is reused (the groups depend on nothing but the
    world size and the partition size); a different size is an error.
    """
    groups = _deepspeed().utils.groups
    create = groups._create_zero_param_parallel_group

    def create_once(group_size: int) -> None:
        if groups._get_zero_param_intra_parallel_group() is None:
            create(group_size)
            return
        have = groups._get_zero_param_intra_parallel_group_world_size()
        if have != min(group_size, dist.get_world_size()):
            raise RuntimeError(
                f"zero_hpz_partition_size={group_size}, but this process already runs hpZ groups of {have} ranks; "
                f"every engine of a run must use the same zero_hpz_partition_size"
            )

    groups._create_zero_param_parallel_group = create_once
    try:
        yield
    finally:
        groups._create_zero_param_parallel_group = create


def hf_deepspeed_config(ds_config: dict[str, Any]):
    """Object that tells transformers' ``from_pretrained`` to load straight into ZeRO-3 partitions.

    The caller must keep it alive while the model is loaded.
    """
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds_config)


def is_partitioned(param: torch.nn.Parameter) -> bool:
    return hasattr(param, "ds_id")


@contextlib.contextmanager
def gathered_params(module: torch.nn.Module, modifier_rank: int | None = None) -> Iterator[None]:
    """Full (unpartitioned) weights of ``module`` on every rank for the duration of the block."""
    params = [p for p in module.parameters() if is_partitioned(p)]
    if not params:
        yield
        return
    with _deepspeed().zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def unpartitioned_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A plain, hook-free copy of a ZeRO-3 partitioned Hugging Face model with full weights on this rank.

    Generating through the engine's own module is unsafe when ranks run different numbers of
    forward passes: ZeRO-3's hooks release and re-fetch parameters even inside
    ``GatheredParameters`` (seen with DeepSpeed 0.19.8: gloo "collective mismatch" on uneven
    shards). A hook-free copy lets every rank generate its own shard independently.

    The copy is the trained model exactly: built on the meta device (no initialisation, no
    memory), each parameter gathered in turn and copied in its training dtype (tied parameters
    stay tied), every buffer copied in the dtype the engine keeps it (RoPE's ``inv_freq`` stays
    fp32 under bf16). Each partitioned parameter is gathered straight into its place in the copy
    (:func:`_full_tensor`), so the peak is the copy itself plus a bounded staging buffer.
    """
    import copy

    dev = device()
    with torch.device("meta"):
        clone = type(module)(copy.deepcopy(module.config))
    sites: dict[int, list[tuple[torch.nn.Module, str]]] = {}  # a meta parameter -> where it sits (ties)
    for mod in clone.modules():
        for attr, p in mod._parameters.items():
            if p is not None:
                sites.setdefault(id(p), []).append((mod, attr))
    targets = dict(clone.named_parameters())
    filled: set[int] = set()
    for name, p in module.named_parameters():
        if name not in targets:
            raise RuntimeError(f"unpartitioned copy: the engine's parameter {name} has no place in the copy")
        full = torch.nn.Parameter(_full_tensor(p, dev), requires_grad=False)
        for mod, attr in sites[id(targets[name])]:
            mod._parameters[attr] = full
        filled.add(id(targets[name]))
    source = dict(module.named_buffers())
    for name, _ in list(clone.named_buffers()):
        if name not in source:
            raise RuntimeError(f"unpartitioned copy: the engine has no buffer {name}")
        owner, _, attr = name.rpartition(".")
        clone.get_submodule(owner)._buffers[attr] = source[name].detach().to(dev, copy=True)
    missing = sorted(n for n, p in targets.items() if id(p) not in filled)
    if missing:
        raise RuntimeError(f"unpartitioned copy: parameters {missing} were not in the engine's module")
    return clone.eval()


# Elements of a rank's partition all-gathered at a time into the generation copy: bounds the
# staging buffers (ours, and gloo's, which stages every all-gather's output once more) to
# 2 x world size x this many elements, whatever the size of the largest parameter.
GATHER_CHUNK_NUMEL = 2**20


def _full_tensor(p: torch.nn.Parameter, dev: torch.device) -> torch.Tensor:
    """A new full tensor of ``p`` on ``dev`` (all ranks together for a partitioned parameter).

    ZeRO-3 keeps rank r's slice ``[r * n, (r + 1) * n)`` of the flattened parameter in
    ``p.ds_tensor`` (the last one padded): all-gathering the slices, a chunk at a time, into one
    flat buffer yields the parameter without the second full-size buffer ``GatheredParameters``
    would allocate. A parameter whose partition is not in memory (NVMe offload) goes through
    ``GatheredParameters``.
    """
    if not is_partitioned(p):
        return p.detach().to(dev, copy=True)
    part = getattr(p, "ds_tensor", None)
    group = getattr(p, "ds_process_group", None)
    n = dist.get_world_size(group)
    if part is None or part.numel() * n < p.ds_numel or getattr(part, "final_location", None) == "nvme":
        with _deepspeed().zero.GatheredParameters([p]):
            return p.detach().to(dev, copy=True)
    part = part.detach().to(dev).view(-1)
    size = part.numel()
    flat = torch.empty(size * n, dtype=part.dtype, device=dev)
    step = min(size, GATHER_CHUNK_NUMEL)
    buf = torch.empty(step * n, dtype=part.dtype, device=dev)
    for a in range(0, size, step):
        b = min(size, a + step)
        out = buf[: (b - a) * n]
        with _collective("generation copy all-gather"):
            dist.all_gather_into_tensor(out, part[a:b].contiguous(), group=group)
        flat.view(n, size)[:, a:b].copy_(out.view(n, b - a))  # rank r's slice goes to [r * size + a, r * size + b)
    return flat[: p.ds_numel].view(p.ds_shape)


def full_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict on the writers (:func:`is_writer`; empty elsewhere), one parameter at a time.

    Gathering per parameter keeps peak memory at one full tensor beyond the partitions, so
    export works for models whose full weights would not fit next to the training state.
    """
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, p in module.named_parameters():
        if id(p) in seen:  # tied weights are saved once, under their first name
            continue
        seen[id(p)] = name
        ctx = _deepspeed().zero.GatheredParameters([p]) if is_partitioned(p) else contextlib.nullcontext()
        with ctx:
            if is_writer():
                out[name] = p.detach().to("cpu", copy=True).contiguous()
    for mod_name, mod in module.named_modules():
        for name, b in mod.named_buffers(recurse=False):
            if is_writer() and b is not None and name not in mod._non_persistent_buffers_set:
                out[f"{mod_name}.{name}" if mod_name else name] = b.detach().to("cpu", copy=True).contiguous()
    return out


def initialize(model: torch.nn.Module, optimizer, scheduler, ds_config: dict[str, Any]):
    """``deepspeed.initialize`` with our optimizer and schedule; returns the engine."""
    engine, _, _, _ = _deepspeed().initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine


def make_optimizer(params, ds_config: dict[str, Any], lr: float, betas, eps: float, weight_decay: float):
    """AdamW: DeepSpeed's CPU Adam when the optimizer is offloaded, else torch's (fused on CUDA)."""
    offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload == "cpu":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adamw_mode=True)
    return torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=torch.cuda.is_available()
    )


def save_checkpoint(engine, ckpt_dir: str, tag: str, client_state: dict[str, Any]) -> None:
    """Write a DeepSpeed checkpoint under ``ckpt_dir/tag`` on all ranks (no ``latest`` file:
    msl_ds advances its own pointer atomically once every rank has finished)."""
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)


def load_checkpoint(engine, ckpt_dir: str, tag: str, universal: bool = False) -> dict[str, Any]:
    """Load ``ckpt_dir/tag`` into ``engine``; ``universal``: a ``ds_to_universal`` conversion.

    DeepSpeed reads ``checkpoint.load_universal`` only while loading, so it is switched on for
    this call rather than in every engine's config (tried with DeepSpeed 0.19.8, ZeRO-3 on CPU:
    2 ranks -> 1 gives identical weights, optimizer moments and schedule).
    """
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = universal or before
    try:
        path, client_state = engine.load_checkpoint(ckpt_dir, tag=tag)
    finally:
        config.load_universal_checkpoint = before
    if path is None:
        raise RuntimeError(f"{ckpt_dir}/{tag}: DeepSpeed could not load this checkpoint")
    return client_state or {}


def global_batch(engine) -> int | None:
    """Rows per optimizer step over all ranks (``train_batch_size``), if the engine knows it."""
    get = getattr(engine, "train_batch_size", None)
    return int(get()) if callable(get) else None


def set_accumulation_boundary(engine, last: bool) -> None:
    """Say whether the next backward closes the gradient-accumulation window.

    msl_ds calls ``engine.step()`` once per global batch, after all of its micro-batches;
    DeepSpeed otherwise counts one micro-step per ``step()`` call and, with
    ``gradient_accumulation_steps`` > 1, would update only on every that-many-th call.
    """
    if hasattr(engine, "set_gradient_accumulation_boundary"):
        engine.set_gradient_accumulation_boundary(last)


def step_applied(engine) -> bool:
    """Whether the last ``engine.step()`` changed the weights.

    ZeRO (stages 1-3, any precision in DeepSpeed 0.19) skips the update when the global gradient
    norm is not finite; fp16 loss scaling skips on overflow.
    """
    applied = getattr(engine, "was_step_applied", None)
    return bool(applied()) if applied is not None else True


def grad_norm(engine) -> float | None:
    """The global gradient norm of the last step (``inf`` after a skipped one), if known."""
    get = getattr(engine, "get_global_grad_norm", None)
    norm = get() if get is not None else None
    return None if norm is None else float(norm)


def fp16_enabled(engine) -> bool:
    enabled = getattr(engine, "fp16_enabled", None)
    return bool(enabled()) if enabled is not None else False


def skipped_steps(engine, default: int) -> int:
    """Steps DeepSpeed skipped on this engine (restored with its checkpoint)."""
    return int(getattr(engine, "skipped_steps", default))


def destroy_engine(engine) -> None:
    """Release an engine's partitions and hooks before the next stage builds its own."""
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def shutdown() -> None:
    """End the process group on every rank: a barrier, then DeepSpeed's and torch's teardown.

    Destroying through DeepSpeed also drops the references its ``groups`` module keeps to the world
    and data-parallel groups; otherwise those process groups (and gloo's worker threads) outlive
    ``destroy_process_group`` and are torn down during interpreter finalization, where a rank can
    abort with "terminate called without an active exception" (SIGABRT) after a successful run.
    """
    if dist.is_initialized():
        with _collective("shutdown barrier"):
            dist.barrier()
    _destroy()


def _destroy() -> None:
    import gc

    if not dist.is_initialized():
        return
    comm = sys.modules.get("deepspeed.comm")
    if comm is not None and comm.is_initialized():
        comm.destroy_process_group()
    if dist.is_initialized():
        dist.destroy_process_group()
    gc.collect()  # the groups' C++ objects (and their threads) go now, while the interpreter is whole


def _destroy_at_exit() -> None:
    """atexit: a rank that leaves without :func:`shutdown` (an error) still destroys its groups
    before interpreter finalization; no barrier, so a dead peer cannot make it hang."""
    with contextlib.suppress(Exception):
        _destroy()
