from twisted.application.service import ServiceMaker

reflservd = ServiceMaker(
    "reflservd",
    "reflservd.tap",
    "The refl1d remote fitting queue server",
    "reflservd",
)
