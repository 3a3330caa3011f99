"""Fused optimizer steps (bitpipe_fx.kernels): one module per optimizer on shared launch machinery.

One optimizer step is one pass over memory per element. Per parameter group and step there is
one launch of a one-program *scalar kernel* and one element-wise launch per bucket (parameters
of the same dtypes and alignment; usually one bucket), whatever the number of tensors.

Layout
------
* one module per optimizer, holding its update equations (docstring), its Triton tile and its
  CPU path: :mod:`.sf_adamw` (Schedule-Free AdamW), :mod:`.sf_sgd` (Schedule-Free SGD),
  :mod:`.adamw` (AdamW with a device-side lr profile); :mod:`.schedulefree` holds what the two
  Schedule-Free ones share (the step's scalars, the y/z update) and :mod:`.lerp` their
  train/eval switch;
* the shared machinery, which knows no optimizer: :mod:`.engine` (GroupKernel: backend choice,
  launches, the torch path's dtype buckets), :mod:`.scalars` (the float64 slot table and the lr
  profiles), :mod:`.tables` (pointer tables), :mod:`.lang` (slot names as Triton constants, exact
  float math, block lookup).

Adding an optimizer
-------------------
1. ``kernels/<name>.py``: the equations in the docstring, and the four names
   :class:`~.engine.OptimizerKernel` asks for: ``advance(profile, slots)`` (the step's scalars on
   the host, float64), ``scalar_kernel(s, PROFILE)`` (the same in Triton), ``torch_update(lists, s)``
   (the CPU path) and ``step_kernel(...)`` (locate the block, form the row's pointers with
   ``lang.address``, call the module's ``tile`` masked or unmasked; copy it from :mod:`.sf_sgd`).
   In the tile, read each scalar once into a named local (``beta1 = tl.load(s + BETA1)``) and
   round it to the state dtype once. Reuse the slots of :mod:`.scalars`; add one there only for
   a hyper-parameter or output no optimizer has yet.
2. ``bitpipe_fx/optim/<name>.py``: a FusedOptimizer subclass naming the kernel module
   (``update = <name>``), its state keys, its checks and its {slot: value} inputs.
3. One line in ``bitpipe_fx/optim/registry.py``, which gives it a ``--optimizer`` name.
   Then run tests/test_kernels_triton.py (the Triton tile against the CPU path) with a case
   for it.

Pointer tables, not flat buffers
--------------------------------
A launch must reach hundreds of tensors. Two ways: copy them into flat buffers (or make the
parameters views of one buffer), or give the kernel a table of addresses. We use tables:

* the parameters belong to the model and the gradients to autograd: flattening them means either
  a copy per step (which would double the memory traffic this kernel exists to minimise) or
  re-homing ``p.data`` and keeping ``p.grad`` a view of a flat buffer, which breaks as soon as
  ``zero_grad(set_to_none=True)`` (the default) or a user's own code replaces a gradient;
* a table costs 8 bytes per tensor and slot plus 4 bytes per block of ``BLOCK`` elements (under
  0.1 % of the traffic), is rebuilt only when an address changes (the check is one tuple compare
  per step, ~0.2 ms of host time for 292 tensors), and works unchanged with the runtime's flat
  gradient buckets, with state tensors loaded from a checkpoint and with mixed dtypes (one table
  per dtype bucket);
* the state could be flat (we own it), but per-parameter state tensors keep ``state_dict()``
  in the layout torch and the ``schedulefree`` package use, so checkpoints interoperate.

The table stores each tensor's element offset from one base tensor per slot rather than its raw
address: the kernel forms ``base + offset``, so the compiler can prove 16-byte alignment (an
int-to-pointer cast would hide it and give scalar loads). Each program looks up its tensor in a
block map and its offset inside it; offsets are int64, so a tensor (or a group) of more than
2^31 elements is handled. Blocks never straddle tensors:
full blocks take an unmasked path with 16-byte vector accesses when every address in the table
is 16-byte aligned (otherwise the bucket runs without the alignment hint), the last block of a
tensor takes a masked path.

No host synchronisation
-----------------------
Each group owns a float64 slot vector on its device (see :mod:`.scalars`): hyper-parameters
written by the host only when they change, the step count, lr_max and Σweight, and this step's
γ, c, bias corrections and REX/cosine/linear lr. The scalar kernel advances them on the device,
so a step never reads a device value back, and a captured CUDA graph replays correct steps.

Precision
---------
State is float32 for float32, bfloat16 and float16 parameters and float64 for float64 ones; the
update is computed in the state dtype from parameters and gradients converted on load. A
low-precision parameter (y in Schedule-Free, the weights in AdamW) is rounded to nearest-even
once per step when stored; z, v and m never are, so no update is lost in the accumulators.
Scalars are computed in float64 and rounded once to the compute dtype, like torch's
``alpha=`` arguments, so float32 results match the ``schedulefree`` package and torch.optim.AdamW
to float32 rounding and float64 results to float64 rounding.

Each module's CPU path (``torch_update``) runs the same math with torch's multi-tensor ops and is
chosen automatically for non-CUDA tensors; under ``TRITON_INTERPRET=1`` the Triton kernels
themselves run on CPU tensors (``backend='triton'``), which is how the tests check them (and,
since the interpreter cannot read device memory, CUDA tensors then take the torch path).
"""

from bitpipe_fx.kernels.engine import (
    BACKENDS,
    DEFAULT_BLOCK,
    DEFAULT_NUM_WARPS,
    GroupKernel,
    OptimizerKernel,
    resolve_backend,
)
from bitpipe_fx.kernels.scalars import Profile

__all__ = ["BACKENDS", "DEFAULT_BLOCK", "DEFAULT_NUM_WARPS", "GroupKernel", "OptimizerKernel", "Profile",
           "resolve_backend"]
