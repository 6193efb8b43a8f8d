"""Gate of step nvtx: a decode with NVTX ranges on against the same decode with them off."""


def test_gate(check_gate, decode_with_flag):
    check_gate(decode_with_flag("nvtx"), rounds=10, host_overhead=True)
