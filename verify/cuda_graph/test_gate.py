"""Gate of step cuda_graph: a decode of 16 tokens with the sampling step graph-replayed against eager."""


def test_gate(check_gate, decode_with_flag):
    check_gate(decode_with_flag("cuda_graph"), rounds=10, host_overhead=True)
