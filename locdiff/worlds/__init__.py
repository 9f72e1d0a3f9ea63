"""The benchmark worlds: generated geolocation benchmarks that need no download.

- `synth` (`locdiff synth`): embeddings from random Fourier features of the place, with look-alikes;
- `realbench` (`locdiff realbench`): embeddings from GeoCLIP's pretrained location encoder;
- `cuebench` (`locdiff cuebench`): embeddings made of discrete cues (country, region, city, landmark, biome);
- `synth_photos`: geotagged JPEGs and a tiny random CLIP, for the demo and the tests.
"""
