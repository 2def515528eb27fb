"""Independent GPT-2 ports used to check that correct implementations never false-alarm and that
bugs nobody on the project wrote are still found.

naive_port.py, torch_port.py  backends (replayed through the tap protocol)
c/gpt2_port.c                 C99 port that writes its own `.npy` dumps
numpy_style_port.py           picoGPT-style NumPy port with its own dump names (numpy_style.toml maps them)
catalog.py                    porting bugs applied to those two, each with the stage it is introduced at
real_ports.py                 build_c_port / run_c_port / run_numpy_style_port: run them on a golden
"""
