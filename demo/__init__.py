"""`vchat demo` (`make demo`): the main job on built-in defaults, driving both frameworks.

`demo.run` holds the steps and the command; `demo.scoring` the held-out questions and their scoring.
"""
