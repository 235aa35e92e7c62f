"""Import hooks that let the Qwen-Omni families load on a CPU install without torchvision.

This folder goes on PYTHONPATH (distill.models.omni_cpu.enable) so that every Python process distill
starts gets the hooks, vLLM's model-inspection subprocess included. It installs a finder only and
imports nothing heavy; then it runs the next sitecustomize on the path, which it would otherwise hide.

1. transformers' image_processing_qwen2_vl imports torchvision at module level, and vLLM's Qwen2-VL
   code (which the Omni models reuse) imports smart_resize from it: serve it from the PIL sibling.
2. Without torchvision transformers does not export VideoProcessorMixin, which ProcessorMixin
   looks up for the Omni processors: resolve it lazily.
3. The Omni processors require a video processor: register an audio-only null one.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys

_REDIRECT = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PATCH = {"transformers.processing_utils", "transformers.models.auto.video_processing_auto"}


def _torchvision_missing() -> bool:
    return importlib.util.find_spec("torchvision") is None


def patch_module(name: str, mod) -> None:
    """Apply the patch for module `name` (also for a module imported before the hook was installed)."""
    if name == "transformers.processing_utils":
        original = mod.ProcessorMixin.get_possibly_dynamic_module
        if getattr(original, "_distill_patched", False):
            return

        def get_possibly_dynamic_module(module_name):
            if module_name == "VideoProcessorMixin":  # lazy: importing it at startup is circular
                from transformers.video_processing_utils import VideoProcessorMixin

                return VideoProcessorMixin
            return original(module_name)

        get_possibly_dynamic_module._distill_patched = True
        mod.ProcessorMixin.get_possibly_dynamic_module = staticmethod(get_possibly_dynamic_module)
    elif name == "transformers.models.auto.video_processing_auto":
        from transformers.video_processing_utils import BaseVideoProcessor

        class NullVideoProcessor(BaseVideoProcessor):
            """Audio-only placeholder with the geometry attributes the Omni processors read."""

            patch_size = 14
            temporal_patch_size = 2
            merge_size = 2
            min_pixels = 128 * 28 * 28
            max_pixels = 768 * 28 * 28

        NullVideoProcessor.__module__ = __name__
        globals()["NullVideoProcessor"] = NullVideoProcessor
        from transformers.models.qwen2_5_omni.configuration_qwen2_5_omni import Qwen2_5OmniConfig
        from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

        for config in (Qwen2_5OmniConfig, Qwen3OmniMoeConfig):
            mod.VIDEO_PROCESSOR_MAPPING.register(config, {"torchvision": NullVideoProcessor}, exist_ok=True)


class _Loader(importlib.abc.Loader):
    def __init__(self, inner=None):
        self.inner = inner

    def create_module(self, spec):
        return None if self.inner is None else self.inner.create_module(spec)

    def exec_module(self, module):
        if self.inner is None:  # the redirect
            from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

            module.smart_resize = pil.smart_resize
            module.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil
            return
        self.inner.exec_module(module)
        patch_module(module.__name__, module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == _REDIRECT:
            return importlib.machinery.ModuleSpec(name, _Loader(None))
        if name in _PATCH:
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader)
            return spec
        return None


def install() -> None:
    """Put the finder first on sys.meta_path (once) and patch what is already imported."""
    if any(isinstance(f, _Finder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Finder())
    for name in _PATCH:
        if name in sys.modules:
            patch_module(name, sys.modules[name])


def _chain() -> None:
    """Run the next sitecustomize on sys.path (a distribution's own), which this one shadows."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        candidate = os.path.join(entry or os.getcwd(), "sitecustomize.py")
        if os.path.abspath(entry or os.getcwd()) != here and os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_distill_chained_sitecustomize", candidate)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            return


if __name__ == "sitecustomize":
    if _torchvision_missing():
        install()
    _chain()
