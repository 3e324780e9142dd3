"""pytest plugin (scripts/upstream_diffusers_schedulers.sh): every DDIM / Euler / DPM-multistep /
flow-match scheduler built during the run gets mmfast's fused step (patch_scheduler) right
after construction; functools.wraps keeps the signature diffusers' config code reads."""
import functools
import os

import diffusers

import mmfast
from mmfast.integrations.diffusers.schedulers import SUPPORTED, patch_scheduler
from mmfast.integrations.patching import PatchHandle

if os.environ.get("MMFAST_UPSTREAM_BACKEND"):
    mmfast.set_backend(os.environ["MMFAST_UPSTREAM_BACKEND"], op="scheduler_step")

for name in SUPPORTED:
    cls = getattr(diffusers, name)
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, __init=init, __cls=cls, **kwargs):
        __init(self, *args, **kwargs)
        if type(self) is __cls:
            patch_scheduler(self, PatchHandle(self, "upstream-tests"))

    cls.__init__ = __init__
