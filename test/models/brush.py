"""A polystyrene brush grafted to silicon, swollen in deuterated and in
hydrogenated toluene: one brush, two measurements fitted together.

The refl1d model bench.parallel runs (data: 10ndt001.refl and 10nht001.refl
from shared/data/refl1d-examples, copied beside this file into the job
directory). Both samples share the substrate, the initiator's thickness, the
brush's shape and the polymer; only the solvents (and so the initiator's
solvent-swollen density) differ.
"""

from refl1d.names import NCNR, SLD, Experiment, FitProblem, PolymerBrush, silicon

oxide = SLD(name="SiOx", rho=3.47)
polystyrene = SLD(name="dPS", rho=6.2)
solvents = {"d": SLD(name="d-toluene", rho=5.66), "h": SLD(name="h-toluene", rho=0.94)}
initiators = {"d": SLD(name="d-initiator", rho=1.5), "h": SLD(name="h-initiator", rho=0.0)}

brushes = {"d": PolymerBrush(polymer=polystyrene, solvent=solvents["d"], base_vf=70, base=120,
                             length=80, power=2, sigma=10)}
shape = brushes["d"]
brushes["h"] = PolymerBrush(polymer=polystyrene, solvent=solvents["h"], base_vf=shape.base_vf,
                            base=shape.base, length=shape.length, power=shape.power, sigma=shape.sigma)

samples = {}
for kind in "dh":
    samples[kind] = (silicon(0, 5) | oxide(100, 5) | initiators[kind](100, 20) | brushes[kind](400, 0)
                     | solvents[kind])
d, h = samples["d"], samples["h"]
for layer in range(4):
    h[layer].thickness = d[layer].thickness
    h[layer].interface = d[layer].interface

for layer in (0, 1, 2):
    d[layer].interface.range(0, 100)
d[1].thickness.range(0, 200)
d[2].thickness.range(0, 200)
polystyrene.rho.range(6.2, 6.5)
oxide.rho.range(2.07, 4.16)
initiators["d"].rho.range(0, 1.5)
initiators["h"].rho.range(-0.5, 0.5)
solvents["d"].rho.pmp(5)
solvents["h"].rho.pmp(5)
shape.base_vf.range(50, 80)
shape.base.range(0, 200)
shape.length.range(0, 500)
shape.power.range(0, 5)
shape.sigma.range(0, 20)

instrument = NCNR.NG7(Qlo=0.005, slits_at_Qlo=0.075)
experiments = [Experiment(sample=samples[kind], probe=instrument.load("10n%st001.refl" % kind, back_reflectivity=True),
                          dA=1) for kind in "dh"]
problem = FitProblem(experiments)
problem.name = "brush"
