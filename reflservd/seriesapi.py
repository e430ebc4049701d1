"""The ``/api/v1/series`` routes (docs/api.md): submit a fit series, read
it (counts by state, members, the table of results as JSON or CSV), cancel
or delete every member. Its domain is ``series.py`` and ``seriesserver.py``;
``site.py`` composes this face with the others."""

from klein import Klein
from twisted.internet import defer

from reflservd import series as S
from reflservd.access import JOB_KEY_HEADER, Access
from reflservd.api import submitParts
from reflservd.errors import Forbidden
from reflservd.faces import answerRefusals, parseBody, submitter
from reflservd.seriesserver import SeriesDesk
from reflservd.web import contentType, jsonBody, readJSON


class SeriesAPI:
    """The JSON API of fit series. Anyone may read a series, as anyone may
    read a job; cancelling or deleting one takes its key (the one its
    submit answered, which is also each member's) or an admin token."""

    app = Klein()
    answerRefusals(app)

    def __init__(self, server, maxUpload=200 * 1024 * 1024, access=None):
        self.server = server
        self.desk = SeriesDesk(server)
        self.maxUpload = maxUpload
        self.access = access or Access()

    @app.route("/api/v1/series", methods=["POST"])
    @defer.inlineCallbacks
    def submit(self, request):
        origin, owner = submitter(self.access, request)
        document, files = yield parseBody(self.server, request, self.maxUpload, _seriesParts,
                                          self.maxUpload)
        series, key = yield self.desk.submit(document, files, origin, owner)
        record = S.seriesRecord(self.server.queue, series)
        record["key"] = key
        return jsonBody(request, record, 201)

    @app.route("/api/v1/series/<int:seriesId>", methods=["GET"])
    def getSeries(self, request, seriesId):
        return jsonBody(request, S.seriesRecord(self.server.queue, self.desk.get(seriesId)))

    @app.route("/api/v1/series/<int:seriesId>/table.json", methods=["GET"])
    def tableJSON(self, request, seriesId):
        return jsonBody(request, S.table(self.server.queue, self.desk.get(seriesId)))

    @app.route("/api/v1/series/<int:seriesId>/table.csv", methods=["GET"])
    def tableCSV(self, request, seriesId):
        text = S.tableCSV(S.table(self.server.queue, self.desk.get(seriesId)))
        request.setHeader(b"Content-Type", b"text/csv; charset=utf-8")
        request.setHeader(b"Content-Disposition", b'attachment; filename="series-%d.csv"' % (seriesId,))
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return text.encode("utf-8")

    def checkControl(self, request, seriesId, what):
        """The series, if the request may cancel or delete it (as for a job:
        its key, an admin token, or its address where it has no key)."""
        self.access.checkSameOrigin(request)
        series = self.desk.get(seriesId)
        if not self.access.mayControl(request, series):
            raise Forbidden("%s series %d needs its key (the %r header the submit answered) "
                            "or an admin token" % (what, seriesId, JOB_KEY_HEADER.decode()))
        return series

    @app.route("/api/v1/series/<int:seriesId>/cancel", methods=["POST"])
    @defer.inlineCallbacks
    def cancel(self, request, seriesId):
        self.checkControl(request, seriesId, "cancelling")
        series = yield self.desk.cancel(seriesId)
        return jsonBody(request, S.seriesRecord(self.server.queue, series))

    @app.route("/api/v1/series/<int:seriesId>", methods=["DELETE"])
    @defer.inlineCallbacks
    def delete(self, request, seriesId):
        self.checkControl(request, seriesId, "deleting")
        series = yield self.desk.delete(seriesId)
        return jsonBody(request, S.seriesRecord(self.server.queue, series))


def _seriesParts(request, maxUpload):
    """The series request and the files of a ``POST /api/v1/series`` body:
    JSON alone (a series without files), or multipart as a job's submit,
    its ``request`` part the series' JSON."""
    if contentType(request) == "application/json":
        return readJSON(request, limit=maxUpload), []
    return submitParts(request, maxUpload)
