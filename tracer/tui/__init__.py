"""Interactive terminal diff (`tracer diff`): browse a comparison stage by stage, token by token.

Needs the optional `textual` dependency (`pip install 'gpt2-tracer[tui]'`); nothing here
imports it until the viewer actually starts.
"""
