"""DME, description-aware mention enhancement (the MMoE paper's first module).

For each mention, candidate descriptions come from a WikiData-style table by label/alias match
(``candidates``); a selector (``backends``: an LLM endpoint, a local sentence encoder, or the
ablations ``first``/``none``) picks the one that fits the mention in its sentence; the choice fills
the record's ``desc``. ``run`` is the command (``python -m data_shards.dme``), ``cache`` keeps
finished selections on disk.
"""

from data_shards.dme.candidates import Candidate, CandidateSettings, CandidateTable, normalise
from data_shards.dme.config import DMEConfig, load_dme_config
from data_shards.dme.run import run_dme

__all__ = ["Candidate", "CandidateSettings", "CandidateTable", "DMEConfig", "load_dme_config", "normalise", "run_dme"]
