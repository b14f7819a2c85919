"""Reader-study statistics, apart from the pipeline's stages: the Obuchowski–Rockette–Hillis
multi-reader multi-case analysis (:mod:`.mrmc`, checked against the Iowa OR-DBM MRMC program) and
its written report (:mod:`.report`). The study's cases, readers and ratings live in the results
store (:mod:`pneumoscan.store.study`)."""
