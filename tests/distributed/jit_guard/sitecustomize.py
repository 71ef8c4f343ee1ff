"""Put on PYTHONPATH by tests/distributed/test_no_jit.py: every Python process it starts (torchrun, each rank)
logs any attempt to build a C++/CUDA extension to $LRM_JIT_ATTEMPTS and refuses it.

DeepSpeed builds an op it was not installed with through ``OpBuilder.jit_load``, which first calls
``torch.utils.cpp_extension.verify_ninja_availability`` and then ``torch.utils.cpp_extension.load``; other code
builds through ``load`` or ``load_inline``. All three are looked up on the module at call time, so replacing them
here, before anything else is imported, sees every attempt - even one whose failure the caller would swallow.
"""

import os

if os.environ.get("LRM_JIT_ATTEMPTS"):
    from torch.utils import cpp_extension

    def _refusing(entry_point: str):
        def refuse(*args, **kwargs):
            name = kwargs.get("name", args[0] if args else "")
            with open(os.environ["LRM_JIT_ATTEMPTS"], "a") as log:
                log.write(f"{entry_point} {name} (pid {os.getpid()})\n")
            raise RuntimeError(f"extension build refused by the no-JIT test: {entry_point} {name}")

        return refuse

    for _entry_point in ("verify_ninja_availability", "load", "load_inline"):
        setattr(cpp_extension, _entry_point, _refusing(_entry_point))
