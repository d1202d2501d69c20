from twisted.application.service import ServiceMaker

steptrack = ServiceMaker(
    "steptrack",
    "steptrackd.tap",
    "Step-ingestion daemon: WebSocket updates in, REST totals out.",
    "steptrack",
)
