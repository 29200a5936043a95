# Buckets, the Dataproc batch service account and the image repository of the training job.
#
#   lake      : Parquet datasets (written on Airflow, read by the job)
#   registry  : published models (written on Airflow; no grant to the job)
#   artifacts : releases/ (job code, read by the job), runs/ (model and metrics, written by the job)

locals {
  buckets = {
    lake      = "${var.name_prefix}-lake-${var.project_id}"
    registry  = "${var.name_prefix}-registry-${var.project_id}"
    artifacts = "${var.name_prefix}-artifacts-${var.project_id}"
  }
}

resource "google_project_service" "this" {
  for_each           = toset(["dataproc.googleapis.com", "artifactregistry.googleapis.com", "storage.googleapis.com"])
  service            = each.value
  disable_on_destroy = false
}

# --- Buckets: uniform access, never public, versioned. ---

resource "google_storage_bucket" "this" {
  for_each                    = local.buckets
  name                        = each.value
  location                    = var.region
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false

  versioning {
    enabled = true
  }

  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.this]
}

# --- The identity Dataproc batches run as. ---

resource "google_service_account" "train" {
  account_id   = "${var.name_prefix}-train"
  display_name = "ADMM MNIST training job (Dataproc Serverless)"
}

# Required for any Dataproc Serverless workload identity. Note that this role also carries
# object permissions project-wide; keep the pipeline in its own project for a hard boundary.
resource "google_project_iam_member" "train_dataproc_worker" {
  project = var.project_id
  role    = "roles/dataproc.worker"
  member  = google_service_account.train.member
}

resource "google_storage_bucket_iam_member" "train_reads_lake" {
  bucket = google_storage_bucket.this["lake"].name
  role   = "roles/storage.objectViewer"
  member = google_service_account.train.member
}

resource "google_storage_bucket_iam_member" "train_reads_artifacts" {
  bucket = google_storage_bucket.this["artifacts"].name
  role   = "roles/storage.objectViewer"
  member = google_service_account.train.member
}

resource "google_storage_bucket_iam_member" "train_writes_runs" {
  bucket = google_storage_bucket.this["artifacts"].name
  role   = "roles/storage.objectUser"
  member = google_service_account.train.member
  condition {
    title      = "runs-only"
    expression = "resource.name.startsWith(\"projects/_/buckets/${google_storage_bucket.this["artifacts"].name}/objects/runs/\")"
  }
}

# --- Container image with Python and the job's packages (infra/docker/dataproc.Dockerfile). ---

resource "google_artifact_registry_repository" "images" {
  location      = var.region
  repository_id = var.name_prefix
  format        = "DOCKER"
  description   = "Runtime images of the ADMM training job"
  depends_on    = [google_project_service.this]
}

resource "google_artifact_registry_repository_iam_member" "train_pulls_images" {
  location   = google_artifact_registry_repository.images.location
  repository = google_artifact_registry_repository.images.name
  role       = "roles/artifactregistry.reader"
  member     = google_service_account.train.member
}

# --- Airflow: create and watch batches as the train account, read and write the buckets. ---

resource "google_project_iam_member" "airflow_dataproc" {
  count   = var.airflow_member == null ? 0 : 1
  project = var.project_id
  role    = "roles/dataproc.editor"
  member  = var.airflow_member
}

resource "google_service_account_iam_member" "airflow_acts_as_train" {
  count              = var.airflow_member == null ? 0 : 1
  service_account_id = google_service_account.train.name
  role               = "roles/iam.serviceAccountUser"
  member             = var.airflow_member
}

resource "google_storage_bucket_iam_member" "airflow_objects" {
  for_each = var.airflow_member == null ? {} : google_storage_bucket.this
  bucket   = each.value.name
  role     = "roles/storage.objectUser"
  member   = var.airflow_member
}
