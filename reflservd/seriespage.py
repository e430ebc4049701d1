"""The page of one fit series (``/series/<id>``, served by ``pages.JobPages``):
its counts by state, the table of its members' results, and a plot of each
fitted parameter against the member, drawn in the browser from
``/api/v1/series/<id>/table.json`` by ``static/series.js``, which keeps the
page up to date while members finish. Every value is made text before it is
rendered (`format.displayText`, `formatValue`), as on a job's page."""

from twisted.web.template import Element, XMLFile, renderer, tags

from reflservd import queue as Q
from reflservd import series as S
from reflservd.elements import NAME_LIMIT, TEMPLATES, _badge, _number, _text
from reflservd.format import displayText, formatValue


class SeriesBody(Element):
    """A series: heading, counts, links to its table, the parameter plots' place, the table."""

    loader = XMLFile(TEMPLATES.child("series.xml"))

    def __init__(self, queue, series):
        Element.__init__(self)
        self.series = series
        self.byState = S.counts(queue, series)
        self.table = S.table(queue, series)

    @renderer
    def seriesId(self, request, tag):
        return str(self.series.id)

    @renderer
    def seriesName(self, request, tag):
        return tag(displayText(self.series.name, limit=NAME_LIMIT))

    @renderer
    def counts(self, request, tag):
        total = len(self.series.members)
        parts = ["%d members" % (total,)]
        parts += ["%d %s" % (self.byState[s], s.lower()) for s in Q.STATUSES + (S.DELETED,)
                  if self.byState.get(s)]
        finished = sum(self.byState.get(s, 0) for s in Q.FINISHED + (S.DELETED,))
        return tag(" · ".join(parts), **{"data-series": str(self.series.id),
                                          "data-finished": "1" if finished == total else "0"})

    @renderer
    def links(self, request, tag):
        base = "/api/v1/series/%d/" % (self.series.id,)
        return tag(tags.a("table (CSV)", href=base + "table.csv"), " · ",
                   tags.a("table (JSON)", href=base + "table.json"))

    @renderer
    def headers(self, request, tag):
        cells = [tags.th("Member", class_="num"), tags.th("Job", class_="num"), tags.th("Data"),
                 tags.th("Status"), tags.th("χ²", class_="num")]
        cells += [tags.th(displayText(name, limit=NAME_LIMIT), class_="num")
                  for name in self.table["parameters"]]
        return tag(tags.tr(cells))

    @renderer
    def rows(self, request, tag):
        rows = []
        for row in self.table["rows"]:
            link = "/jobs/%d" % (row["id"],)
            cells = [tags.td(str(row["member"]), class_="num"),
                     tags.td(tags.a(str(row["id"]), href=link), class_="num"),
                     tags.td(_text(row["data"], NAME_LIMIT)),
                     tags.td(_badge(row["status"])(id="status-%d" % (row["id"],))),
                     tags.td(_number(row["chisq"]), class_="num")]
            for name in self.table["parameters"]:
                fit = row["parameters"].get(name)
                cells.append(tags.td(formatValue(fit["value"], fit["uncertainty"])
                                     if fit and fit["value"] is not None else "–", class_="num"))
            rows.append(tags.tr(cells, class_="member"))
        return tag(rows)
