"""The speculation plot follows a real generation with n-gram drafts: its acceptance line
fills while tokens stream, and ends at the request's own metrics."""

from __future__ import annotations

import workbench
from workbench.dashboards import Dashboard, SpeculationPlot

# Asked to copy code, the model's answer repeats its prompt: n-gram lookup drafts it.
CODE = '''def area(width, height):
    return width * height

def perimeter(width, height):
    return 2 * (width + height)

def is_square(width, height):
    return width == height
'''


def test_speculation_plot_follows_drafts(loaded):
    # refreshed by hand only: the refresher thread waits an hour between its updates
    d = Dashboard(loaded, refresh_s=3600)
    try:
        plot = d.speculation
        assert isinstance(plot, SpeculationPlot) and plot in d.plots
        s = workbench.chat(f"Repeat this Python code exactly:\n\n{CODE}", stream=True,
                           temperature=0, max_tokens=64, speculative="ngram")
        streaming = []
        for i, _ in enumerate(s):
            if i % 8 == 7:
                d.refresh()
                streaming.append(plot.points(s.id)[-1])
        m = s.metrics
        d.refresh()

        assert m.speculative == "ngram" and m.draft_tokens > 0 and m.accepted_tokens > 0
        # drawn while the request ran: points with drafts before the last token
        assert any(p.acceptance is not None for p in streaming)
        points = plot.points(s.id)
        assert len(points) >= 3
        for p in points:  # running totals of this request
            assert p.request_id == s.id
            assert 0 <= p.accepted <= p.drafted and p.generated <= m.generated_tokens
            assert p.acceptance is None or 0.0 <= p.acceptance <= 1.0
            assert 0.0 <= p.from_drafts < 1.0
        assert [p.drafted for p in points] == sorted(p.drafted for p in points)
        assert [p.generated for p in points] == sorted(p.generated for p in points)
        # the streamed totals reach the final metrics, which close the line
        last = points[-1]
        assert (last.generated, last.drafted, last.accepted) == \
            (m.generated_tokens, m.draft_tokens, m.accepted_tokens)
        assert last.acceptance == m.acceptance
        streamed = points[-2]
        assert streamed.drafted <= m.draft_tokens and streamed.accepted <= m.accepted_tokens
        acceptance = [y for y in plot.figure.data[0].y if y is not None]
        assert acceptance[-1] == m.acceptance and all(0 <= y <= 1 for y in acceptance)
        assert plot.figure.data[1].y[-2] == m.accepted_tokens / m.generated_tokens
        assert f"{m.accepted_tokens}/{m.draft_tokens} drafts accepted" in \
            plot.figure.layout.title.text
        assert "drafts accepted" in d.header.value

        # the next request starts from zero: without speculation, nothing is drafted
        off = workbench.chat("Say hi.", temperature=0, max_tokens=8, speculative="off")
        d.refresh()
        assert off.metrics.draft_tokens == 0
        assert [p.drafted for p in plot.points()] == [0] * len(plot.points())
        assert plot.points(s.id)[-1] == last  # the earlier request's line stays
        assert "nothing drafted" in plot.figure.layout.title.text
    finally:
        d.stop()
    assert not d.running
