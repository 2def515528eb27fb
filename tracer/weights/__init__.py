"""Weight audit (`tracer weights`): where does each golden parameter live in a port's checkpoint?

Most failed ports never reach a numerical bug: a weight was not transposed, not split, never
loaded, tied wrongly or left at its init. The audit finds every golden parameter in the port's
own file, by name through a weight map and by content (transposed, sliced out of a fused or
stacked tensor, concatenated from parts, padded, in another dtype or quantized), and says for
each what it is and, when it is wrong, how to fix it. `load.port_weights` hands the same
findings to `compare --weights`. Format of the weight maps: docs/WEIGHTS.md.
"""
