"""Post-training algorithms on a prepared model: calibration with its observers (`calibrate`,
`observers`), SmoothQuant (`smooth`), GPTQ with its rounding (`gptq`, `rounding`), and the
plumbing they share for running data and merging statistics across ranks (`data`)."""
