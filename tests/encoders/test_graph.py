"""``encoders.graph.as_graph``: the one place that decides whether a forward runs as a traced graph."""

import torch

from mmembed.encoders.graph import as_graph


def test_only_cpu_inputs_are_traced_and_the_graph_answers_as_the_forward_does() -> None:
    """Graphs were measured on CPU only; inputs elsewhere (a meta tensor stands in for a GPU's, which
    this machine lacks) keep the eager forward without tracing it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 4)).eval()
    assert as_graph("m", model, model, (torch.zeros(2, 4, device="meta"),), []) is None
    graph = as_graph("m", model, model, (torch.randn(2, 4),), [(torch.randn(5, 4),)])
    assert isinstance(graph, torch.jit.ScriptModule)
    x = torch.randn(7, 4)
    with torch.inference_mode():
        torch.testing.assert_close(graph(x), model(x))
