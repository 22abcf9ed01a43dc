"""lmms-eval plugin: ``lmms-eval --model unclutter --model_args pretrained=...,method=vmtc+cmai --tasks gqa``.

Registered through the ``lmms_eval.models`` entry-point group (see pyproject.toml); `manifest` is the
entry point and stays light, the model class lives in `unclutter.integrations.lmms_eval_model`.
"""

from __future__ import annotations


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(
        model_id="unclutter",
        simple_class_path="unclutter.integrations.lmms_eval_model.UnclutterVLM",
        aliases=("unclutter_llava",),
    )
