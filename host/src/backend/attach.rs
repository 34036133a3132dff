//! Creating a device's xenstore entries the way a toolstack does: the backend directory
//! (owned by the backend's domain, readable by the guest) and the frontend directory (owned
//! by the guest, readable by the backend), in one transaction.

use super::vbd::Vbd;
use crate::xen::xenstore::{transaction, Access, Perm, Xenstore, XsError};

/// The backend type: the one `xl`'s `backendtype=tap` uses, served by this host.
pub const BACKEND_TYPE: &str = "vbd3";

/// The two directories of a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevicePaths {
    /// The backend's.
    pub backend: String,
    /// The frontend's.
    pub frontend: String,
}

/// Paths for disk `vbd` of `guest` served by `backend_domid`.
pub fn device_paths(backend_domid: u32, guest: u32, vbd: Vbd) -> DevicePaths {
    let devid = vbd.number();
    DevicePaths {
        backend: format!("/local/domain/{backend_domid}/backend/{BACKEND_TYPE}/{guest}/{devid}"),
        frontend: format!("/local/domain/{guest}/device/vbd/{devid}"),
    }
}

/// Writes both directories (state Initialising) with their permissions.
pub fn create_device(
    xs: &dyn Xenstore,
    backend_domid: u32,
    guest: u32,
    vbd: Vbd,
    read_only: bool,
) -> Result<DevicePaths, XsError> {
    let p = device_paths(backend_domid, guest, vbd);
    let devid = vbd.number().to_string();
    let be_perms = [
        Perm {
            domid: backend_domid,
            access: Access::None,
        },
        Perm {
            domid: guest,
            access: Access::Read,
        },
    ];
    let fe_perms = [
        Perm {
            domid: guest,
            access: Access::None,
        },
        Perm {
            domid: backend_domid,
            access: Access::Read,
        },
    ];
    let (be, fe) = (&p.backend, &p.frontend);
    let backend_keys = [
        ("frontend", fe.as_str()),
        ("frontend-id", &guest.to_string()),
        ("online", "1"),
        ("removable", "0"),
        ("state", "1"),
        ("mode", if read_only { "r" } else { "w" }),
        ("type", BACKEND_TYPE),
        ("dev", &vbd.linux_name()),
        ("device-type", "disk"),
    ]
    .map(|(k, v)| (k, v.to_string()));
    let frontend_keys = [
        ("backend", be.as_str()),
        ("backend-id", &backend_domid.to_string()),
        ("state", "1"),
        ("virtual-device", devid.as_str()),
        ("device-type", "disk"),
    ]
    .map(|(k, v)| (k, v.to_string()));
    transaction(xs, |tx| {
        xs.mkdir(tx, be)?;
        xs.set_perms(tx, be, &be_perms)?;
        for (k, v) in &backend_keys {
            let path = format!("{be}/{k}");
            xs.write(tx, &path, v.as_bytes())?;
            xs.set_perms(tx, &path, &be_perms)?;
        }
        xs.mkdir(tx, fe)?;
        xs.set_perms(tx, fe, &fe_perms)?;
        for (k, v) in &frontend_keys {
            let path = format!("{fe}/{k}");
            xs.write(tx, &path, v.as_bytes())?;
            xs.set_perms(tx, &path, &fe_perms)?;
        }
        Ok(())
    })?;
    Ok(p)
}
