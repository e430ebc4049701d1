from twisted.application.service import ServiceMaker

reflworkerd = ServiceMaker(
    "reflworkerd",
    "reflworkerd.tap",
    "A reflservd worker: pulls fits and runs them confined",
    "reflworkerd",
)
