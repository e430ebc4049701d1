"""reflworkerd: a pull worker that runs refl1d fits for reflservd."""
