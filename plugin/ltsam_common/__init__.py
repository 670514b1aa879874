"""Torch-free pieces every part of the project shares: the method / loss / sampler names and the YAML loader.

Why a top-level package and not ``ltsam.names``: ``import ltsam`` imports torch and timm and registers the
optimizers in timm (that is its contract with ``--device-modules ltsam`` and ``import ltsam``), and importing
any ``ltsam.<module>`` runs that first. The launcher (``launch/``) validates a 16-GPU recipe on a laptop without
torch, so what it shares with the plugin lives here, beside ``ltsam``, importing nothing but PyYAML (and the
launcher's torch-free lr rule). So do the ``ltsam`` command (``cli``) and ``ltsam train``'s flags
(``train_args``): ``ltsam --help``, ``ltsam train --help`` and the launcher's check of a recipe's program args
answer without torch.
"""
