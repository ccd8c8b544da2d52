"""Whether a job's model fits the worker's memory, asked before it is scored.

Scoring holds at least four copies of the parameters at once (the weights, their gradients, the
vector of a Hessian-vector product and its result); activations of the calibration batch come on
top. A search over allocations (`search.candidates` > 1) scores a copy of the loaded model and
keeps the loaded model, the best candidate so far and, while a candidate recovers, its weights
from before (restored if the recovery does not help) beside it: three more. A distillation (a
`distill` job, a fine-tune that distils, a causal LM's search) keeps the original frozen beside
them: one more. A model whose copies do not fit in what the worker may use fails at once
with `out_of_memory` and the figures, instead of being killed by the kernel half-way through.
"""

from pathlib import Path

import torch
from torch.nn.parameter import is_lazy

from service.core.errors import CodedError

SCORING_COPIES = 4
# the loaded model a search copies each candidate from, the best so far, and a candidate's
# weights from before its recovery
SEARCH_COPIES = 3
# the frozen model a distillation compares with (`JobSpec.distils_from_the_original`)
TEACHER_COPIES = 1
GIB = 1024**3


class OutOfMemory(CodedError):
    def __init__(self, message: str) -> None:
        super().__init__("out_of_memory", message)


def scoring_bytes(net: torch.nn.Module, copies: int = SCORING_COPIES) -> int:
    """A lower bound of the memory scoring `net` takes, `copies` of its parameters (lazy
    parameters, sized by the first forward pass, count for nothing yet)."""
    sized = (p for p in net.parameters() if not is_lazy(p))
    return copies * sum(p.numel() * p.element_size() for p in sized)


def readable(size: float) -> str:
    """Bytes as people read them: 1.5 GiB, 12 MiB, 640 KiB."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.3g} {unit}"
    return f"{size:.0f} B"


def free_bytes(device: torch.device, limit: int) -> int:
    """What the worker may still use on `device`: the operator's `limit` when set (bytes), else
    what the device reports free."""
    if limit:
        return limit
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return _available_ram()


def check_fits(
    net: torch.nn.Module,
    device: torch.device,
    limit: int,
    searching: bool = False,
    teacher: bool = False,
) -> None:
    """Refuse (`OutOfMemory`) a model whose copies do not fit: scoring's, a search's
    (`searching`) and a distillation's teacher (`teacher`)."""
    copies = SCORING_COPIES + (SEARCH_COPIES if searching else 0)
    copies += TEACHER_COPIES if teacher else 0
    needed, free = scoring_bytes(net, copies), free_bytes(device, limit)
    if needed > free:
        held = ", and the three more copies a search holds" if searching else ""
        held += ", and the teacher a distillation compares with" if teacher else ""
        fewer = " or with search.candidates 1" if searching else ""
        raise OutOfMemory(
            f"scoring this model needs at least {readable(needed)} on {device.type} "
            f"(weights, gradients and Hessian-vector products{held}); the worker has "
            f"{readable(free)}. Run it on a worker with more memory{fewer}",
        )


def _available_ram() -> int:
    """MemAvailable, bounded by the cgroup's limit when the worker runs in a container."""
    available = _meminfo_kib("MemAvailable") * 1024
    limit_file = Path("/sys/fs/cgroup/memory.max")
    usage_file = Path("/sys/fs/cgroup/memory.current")
    if limit_file.exists() and usage_file.exists():
        limit = limit_file.read_text().strip()
        if limit.isdigit():
            available = min(available, int(limit) - int(usage_file.read_text()))
    return available


def _meminfo_kib(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0])
    raise RuntimeError(f"/proc/meminfo has no {field}")


def describe(error: BaseException, device: torch.device) -> OutOfMemory:
    """The job error for an allocation that failed half-way (torch's message has the figure)."""
    detail = " ".join(str(error).split())[:240].rstrip(". ") or "an allocation failed"
    return OutOfMemory(
        f"the job ran out of memory on {device.type}: {detail}. Use a smaller calibration "
        "batch_size, or a worker with more memory"
    )
