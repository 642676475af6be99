"""clex.hf.compat: activation checkpointing by the name the installed transformers uses, without its warning."""

import warnings

from conftest import tiny_model

from clex.hf.compat import set_activation_checkpointing


def _on(model) -> bool:
    new = hasattr(type(model), "is_activation_checkpointing")
    return bool(model.is_activation_checkpointing if new else model.is_gradient_checkpointing)


def test_checkpointing_turns_on_and_off_without_a_deprecation_warning():
    model = tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated alias warns; the current name does not
        set_activation_checkpointing(model)
        assert _on(model)
        set_activation_checkpointing(model, False)
        assert not _on(model)
        set_activation_checkpointing(model, False)  # off when already off: nothing to do, no error


def test_a_release_without_the_new_name_gets_the_old_one():
    calls = []

    class Old:  # transformers before 5.24: only gradient_checkpointing_*
        is_gradient_checkpointing = False

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            calls.append(("enable", gradient_checkpointing_kwargs))
            self.is_gradient_checkpointing = True

        def gradient_checkpointing_disable(self):
            calls.append(("disable", None))
            self.is_gradient_checkpointing = False

    old = Old()
    set_activation_checkpointing(old)
    set_activation_checkpointing(old, False)
    assert calls == [("enable", {"use_reentrant": False}), ("disable", None)]
