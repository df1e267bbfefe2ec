"""Shared test settings: small thread count (the CI box has 2 cores), deterministic CPU math."""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

torch.set_num_threads(2)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")  # for CLI subprocesses


def perturbed(model, seed=0, std=0.05):
    """Noise on every weight: a fresh model has zero-initialised residual branches (its output ignores t)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def refused_in_one_line(main, argv, capsys, *words):
    """main(argv) exits non-zero with one line of message holding every word, and no traceback; returns it."""
    import pytest
    with pytest.raises(SystemExit) as exc:
        main(argv)
    code = exc.value.code
    err = capsys.readouterr().err + (code if isinstance(code, str) else "")
    assert code not in (0, None), f"{argv}: accepted (exit {code!r})"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err
