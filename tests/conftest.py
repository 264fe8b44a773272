import os

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def debias_cache(tmp_path_factory):
    """Keep tiny models and SAEs built by tests out of the user's cache (slow tests set their own)."""
    if "DEBIAS_CACHE" not in os.environ:
        os.environ["DEBIAS_CACHE"] = str(tmp_path_factory.mktemp("debias-cache"))
    return os.environ["DEBIAS_CACHE"]


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (slow on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_module(**overrides):
    from debias.module import DebiasModule

    kwargs = dict(base_model="tiny-llama", sae="tiny:blocks.1.hook_mlp_out", features=[3], k=40, lr=0.05,
                  max_length=32)
    kwargs.update(overrides)
    return DebiasModule(**kwargs)


def make_data(**overrides):
    from debias.data import DebiasDataModule

    kwargs = dict(batch_size=4, eval_batch_size=16, max_texts=24)
    kwargs.update(overrides)
    return DebiasDataModule(**kwargs)


def make_trainer(tmp_path, max_steps=6, callbacks=(), **overrides):
    from lightning.pytorch import Trainer

    kwargs = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                  default_root_dir=str(tmp_path), enable_checkpointing=False)
    kwargs.update(overrides)
    return Trainer(callbacks=list(callbacks), **kwargs)
