import megaphi  # noqa: F401  (the package imports at all)


def test_extension_imports():
    import megaphi._C  # noqa: F401  (built from csrc/data by setup.py)

    assert megaphi.__version__
