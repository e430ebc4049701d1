"""reflservd: the refl1d remote fitting queue server."""
