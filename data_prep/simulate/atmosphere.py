"""A compact radiative-transfer model for at-sensor radiance (L1) from surface reflectance.

``L = E0 cos(sza) T_down T_up rho / pi + L_path`` on the 1 nm grid, in uW cm-2 sr-1 nm-1:

* ``E0``: top-of-atmosphere solar irradiance, a 5778 K blackbody scaled so that its peak is
  1.9e3 W m-2 um-1 (= 1.9 W m-2 nm-1 = 190 uW cm-2 nm-1; 1 W m-2 nm-1 = 100 uW cm-2 nm-1).
* ``T``: direct transmittance ``exp(-tau / mu)`` with Rayleigh (lambda^-4), aerosol (Angstrom) and
  Gaussian-shaped absorption optical depths of water vapour (720, 820, 940, 1140, 1380, 1880, 2700 nm
  wing) scaled by the column water vapour, O2 (688, 760 nm) and CO2 (2010, 2060 nm).
* ``L_path``: single-scattering path radiance of the Rayleigh and aerosol optical depths, falling
  like lambda^-4 in the blue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from data_prep.simulate.library import GRID_NM

H = 6.62607015e-34
C = 2.99792458e8
KB = 1.380649e-23

#: (centre nm, sigma nm, optical depth at 1 cm column water vapour)
WATER_BANDS = ((720.0, 8.0, 0.03), (820.0, 10.0, 0.05), (940.0, 18.0, 0.3), (1140.0, 22.0, 0.35),
               (1380.0, 35.0, 6.0), (1880.0, 35.0, 4.0), (2650.0, 70.0, 8.0))
#: (centre nm, sigma nm, optical depth)
GAS_BANDS = ((688.0, 2.5, 0.08), (762.0, 3.0, 1.2), (2010.0, 10.0, 0.12), (2060.0, 10.0, 0.1))


def solar_irradiance(grid_nm: np.ndarray = GRID_NM, peak_w_m2_um: float = 1.9e3) -> np.ndarray:
    """TOA solar spectral irradiance in uW cm-2 nm-1 (blackbody 5778 K, peak ``peak_w_m2_um``)."""
    lam = grid_nm * 1e-9
    b = 1.0 / (lam**5 * (np.exp(H * C / (lam * KB * 5778.0)) - 1.0))
    b_peak = b.max() if grid_nm[0] <= 502 <= grid_nm[-1] else None
    if b_peak is None:  # peak of a 5778 K blackbody (Wien: 501.5 nm)
        lp = 501.5e-9
        b_peak = 1.0 / (lp**5 * (np.exp(H * C / (lp * KB * 5778.0)) - 1.0))
    w_m2_um = peak_w_m2_um * b / b_peak
    # W m-2 um-1 -> W m-2 nm-1 (/1e3) -> uW cm-2 nm-1 (x1e6 / 1e4 = x100)
    return w_m2_um / 1e3 * 100.0


@dataclass(frozen=True)
class Atmosphere:
    """Observation and atmosphere state of one acquisition."""

    sza_deg: float = 35.0
    vza_deg: float = 0.0
    water_vapour_cm: float = 1.5
    aod550: float = 0.1
    angstrom: float = 1.3

    def optical_depth(self, grid_nm: np.ndarray = GRID_NM) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tau_rayleigh, tau_aerosol, tau_absorption) on the grid."""
        um = grid_nm / 1000.0
        tau_r = 0.008569 * um**-4 * (1.0 + 0.0113 * um**-2 + 0.00013 * um**-4)
        tau_a = self.aod550 * (grid_nm / 550.0) ** -self.angstrom
        tau_g = np.zeros_like(grid_nm)
        for c, s, d in WATER_BANDS:
            tau_g += self.water_vapour_cm * d * np.exp(-0.5 * ((grid_nm - c) / s) ** 2)
        for c, s, d in GAS_BANDS:
            tau_g += d * np.exp(-0.5 * ((grid_nm - c) / s) ** 2)
        return tau_r, tau_a, tau_g

    def terms(self, grid_nm: np.ndarray = GRID_NM) -> tuple[np.ndarray, np.ndarray]:
        """``(gain, path)`` on the grid: L = gain * rho + path, in uW cm-2 sr-1 nm-1."""
        mu_s = np.cos(np.deg2rad(self.sza_deg))
        mu_v = np.cos(np.deg2rad(self.vza_deg))
        tau_r, tau_a, tau_g = self.optical_depth(grid_nm)
        tau = tau_r + tau_a + tau_g
        t_down = np.exp(-tau / mu_s)
        t_up = np.exp(-tau / mu_v)
        e0 = solar_irradiance(grid_nm)
        gain = e0 * mu_s * t_down * t_up / np.pi
        # single scattering: Rayleigh phase ~0.75(1+cos^2), aerosol forward-scattering ~0.2 into nadir view
        phase_r = 0.75 * (1.0 + np.cos(np.deg2rad(180.0 - self.sza_deg)) ** 2)
        path = e0 * mu_s / (4.0 * np.pi * mu_s * mu_v) * (tau_r * phase_r + 0.2 * tau_a) * np.exp(-tau_g)
        path *= np.exp(-0.5 * (tau_r + tau_a) * (1.0 / mu_s + 1.0 / mu_v))
        return gain, path

    def transmittance(self, grid_nm: np.ndarray = GRID_NM) -> np.ndarray:
        """Two-way direct transmittance T_down T_up."""
        tau = sum(self.optical_depth(grid_nm))
        return np.exp(-tau / np.cos(np.deg2rad(self.sza_deg)) - tau / np.cos(np.deg2rad(self.vza_deg)))
