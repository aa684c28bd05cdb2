"""World builders beyond the embedded synthetic world (:mod:`msl_ds.world`).

``geonames``: a known-facts world from real data (countries' capitals, currencies, continents),
kept only where a given checkpoint already answers right (``msl-make-world --source geonames``).
"""
