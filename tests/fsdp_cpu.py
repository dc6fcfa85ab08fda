"""`nanobooth train` under accelerate's FSDP on CPU processes (gloo), for test_distributed only.

accelerate (1.15) turns FSDP on only in accelerator worlds: a CPU world is MULTI_CPU, i.e. DDP, whatever
`--use_fsdp` says. torch's FSDP2 itself runs on gloo, so this marks the CPU world FSDP (with the plugin
accelerate built from the launch flags) before nanobooth builds its Accelerator; the rest is nanobooth's code.
"""

import sys

from accelerate.state import AcceleratorState, DistributedType, PartialState

_init = AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # each AcceleratorState() copies it from here


AcceleratorState.__init__ = _fsdp_on_cpu

if __name__ == "__main__":
    from nanobooth.cli import main

    sys.exit(main(sys.argv[1:]))
